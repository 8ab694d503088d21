"""Backend-neutral row handling: completion records to and from table rows, JSON columns, LIMIT clauses."""

from __future__ import annotations

import json
from typing import Any

from rlhf_online.errors import InvalidArgument
from rlhf_online.store.base import CompletionRecord

COMPLETION_COLUMNS = ("id, created_at, prompt, messages, text, policy_version, user_id, params, "
                      "prompt_tokens, completion_tokens, finish_reason, metadata, prompt_token_ids, token_ids, tenant")
COMPLETION_PLACEHOLDERS = ", ".join("?" * len(COMPLETION_COLUMNS.split(",")))


def limited(sql: str, args: list[Any], limit: int | None) -> tuple[str, list[Any]]:
    """The query (in `?` placeholders) with a LIMIT clause when one was asked for."""
    if limit is None:
        return sql, args
    if limit < 0:
        raise InvalidArgument("limit", f"must be >= 0, got {limit}")
    return f"{sql} LIMIT ?", [*args, limit]


def to_json(field_name: str, value: Any) -> str:
    """Serialise a JSON column; a value that cannot be stored is the caller's InvalidArgument."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(field_name, f"not JSON-serialisable: {e}") from e


def completion_row(r: CompletionRecord, now: float) -> tuple:
    """A record as the completions table's columns; created_at 0 means now."""
    if not r.completion_id:
        raise InvalidArgument("completion_id", "must not be empty")
    return (r.completion_id, r.created_at or now, r.prompt, to_json("messages", [list(m) for m in r.messages]),
            r.text, r.policy_version, r.user_id, to_json("params", r.params), int(r.prompt_tokens),
            int(r.completion_tokens), r.finish_reason, to_json("metadata", r.metadata),
            to_json("prompt_token_ids", [int(t) for t in r.prompt_token_ids]),
            to_json("token_ids", [int(t) for t in r.token_ids]), r.tenant)


def completion_record(row: tuple) -> CompletionRecord:
    """A completions row back as a record, JSON columns decoded."""
    (cid, created_at, prompt, messages, text, policy_version, user_id, params,
     prompt_tokens, completion_tokens, finish_reason, metadata, prompt_token_ids, token_ids, tenant) = row
    return CompletionRecord(
        completion_id=cid, prompt=prompt, messages=tuple((role, content) for role, content in json.loads(messages)),
        text=text, policy_version=policy_version, user_id=user_id, params=json.loads(params),
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, finish_reason=finish_reason,
        metadata=json.loads(metadata), created_at=created_at,
        prompt_token_ids=tuple(json.loads(prompt_token_ids)), token_ids=tuple(json.loads(token_ids)), tenant=tenant)
