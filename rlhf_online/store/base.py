"""The store interface: completions, feedback and preferences, with the records it returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhf_online.errors import InvalidArgument

RATINGS = ("thumbs_up", "thumbs_down")
ROLES = ("user", "annotator")  # what an API key may do: rate what was served to its users, or rate anything


def check_rating(rating: str) -> None:
    """InvalidArgument naming `rating` unless it is one of RATINGS."""
    if rating not in RATINGS:
        raise InvalidArgument("rating", f"must be one of {', '.join(RATINGS)}, got {rating!r}")


def check_preference_pair(chosen_completion_id: str, rejected_completion_id: str) -> None:
    """A completion cannot be preferred over itself."""
    if chosen_completion_id == rejected_completion_id:
        raise InvalidArgument("rejected_completion_id", "must differ from chosen_completion_id")


def check_ranking(completion_ids: Sequence[str]) -> tuple[str, ...]:
    """The ids of a ranking, best first: at least two, each once (a strict order: ties cannot be sent)."""
    ids = tuple(completion_ids)
    if len(ids) < 2:
        raise InvalidArgument("completion_ids", f"a ranking needs at least 2 completions, got {len(ids)}")
    repeated = sorted({c for c in ids if ids.count(c) > 1})
    if repeated:
        raise InvalidArgument("completion_ids", f"each completion may appear once (a strict order, best first); "
                                                f"repeated: {', '.join(repeated)}")
    return ids


@dataclass(frozen=True)
class CompletionRecord:
    """One logged completion and how it was produced."""

    completion_id: str
    prompt: str  # prompt text as given ("" when chat messages were used)
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...); () when a prompt was used
    text: str
    policy_version: str  # "" = bare base model
    user_id: str = ""
    params: dict = field(default_factory=dict)  # sampling params, JSON-serialisable
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""  # "length" | "eos" | "stop"
    metadata: dict = field(default_factory=dict)  # str -> str
    created_at: float = 0.0  # unix seconds; 0 = now
    prompt_token_ids: tuple[int, ...] = ()  # the tokens the model was given (chat template applied); () if unknown
    token_ids: tuple[int, ...] = ()  # the tokens it sampled, EOS included when it ended there; () if unknown
    tenant: str = ""  # the API key's tenant it was served to ("" with authentication off)


@dataclass(frozen=True)
class Rater:
    """Who sent a rating, preference or ranking: the caller's tenant and key role ("" with authentication off)."""

    tenant: str = ""
    role: str = ""  # "" | "user" | "annotator"


NO_RATER = Rater()


@dataclass(frozen=True)
class ApiKeyRecord:
    """A stored API key: the public id, the sha256 of its secret, whose it is and what it may do."""

    key_id: str
    secret_sha256: str
    tenant: str
    role: str  # one of ROLES
    created_at: float
    revoked_at: float | None = None


@dataclass(frozen=True)
class FeedbackRecord:
    """A thumbs-up/down; `seq` increases monotonically for incremental reads."""

    seq: int
    completion_id: str
    user_id: str
    rating: str
    comment: str
    created_at: float
    tenant: str = ""
    rater_role: str = ""  # "" (authentication off) | "user" | "annotator"


@dataclass(frozen=True)
class PreferenceRecord:
    """A user preferred one completion over another."""

    seq: int
    chosen_completion_id: str
    rejected_completion_id: str
    user_id: str
    created_at: float
    tenant: str = ""
    rater_role: str = ""


@dataclass(frozen=True)
class RankingRecord:
    """A user ranked k completions of one prompt, best first."""

    seq: int
    completion_ids: tuple[str, ...]  # best first
    user_id: str
    created_at: float
    tenant: str = ""
    rater_role: str = ""


@dataclass(frozen=True)
class RatingEvidence:
    """What users said about one completion: thumbs, preferences won or lost, and its places in rankings."""

    thumbs_up: int = 0
    thumbs_down: int = 0
    preferred: int = 0  # times it was the chosen side of a preference
    dispreferred: int = 0  # times it was the rejected side
    ranked: int = 0  # rankings it was in
    # Its places in them, each (k - 1 - 2 * place) / (k - 1) for place 0 (best) .. k - 1 of k: +1 ranked
    # first, -1 last, 0 in the middle; one ranking is one verdict on each of its completions.
    ranked_net: float = 0.0

    @property
    def count(self) -> int:
        """Every rating, preference side and ranking, up or down."""
        return self.thumbs_up + self.thumbs_down + self.preferred + self.dispreferred + self.ranked

    @property
    def net(self) -> float:
        """Verdicts for minus verdicts against: ups, wins and ranking places, each in [-1, 1]."""
        return self.thumbs_up + self.preferred - self.thumbs_down - self.dispreferred + self.ranked_net


@dataclass(frozen=True)
class VersionComparison:
    """Users' verdicts on two policy versions' completions over the same period (a canary and its stable)."""

    a_up: int = 0  # thumbs-up on version a's completions
    a_rated: int = 0  # thumbs ratings on them, up or down
    b_up: int = 0
    b_rated: int = 0
    a_wins: int = 0  # preferences between a completion of a and one of b where a's was chosen
    pairs: int = 0  # preferences between a completion of a and one of b


class Store(ABC):
    """Durable, thread-safe storage of completions and the feedback on them."""

    @abstractmethod
    def add_completions(self, records: Sequence[CompletionRecord]) -> None:
        """Insert completions in one transaction (InvalidArgument on a duplicate id)."""

    @abstractmethod
    def get_completion(self, completion_id: str) -> CompletionRecord:
        """One completion, or NotFound."""

    @abstractmethod
    def get_completions(self, completion_ids: Iterable[str]) -> dict[str, CompletionRecord]:
        """The completions with these ids, in the order first given; ids not in the store are left out."""

    @abstractmethod
    def recent_prompts(self, limit: int) -> list[str]:
        """Distinct prompts of the newest `limit` completions with a plain prompt, in code-point order."""

    @abstractmethod
    def served_completions(self, policy_version: str, after_created_at: float = 0.0,
                           limit: int | None = None) -> list[CompletionRecord]:
        """Completions one policy version served after a time, newest first."""

    @abstractmethod
    def count_served(self, policy_version: str, after_created_at: float = 0.0) -> int:
        """How many completions one policy version served after a time."""

    @abstractmethod
    def add_feedback(self, completion_id: str, user_id: str, rating: str, comment: str = "",
                     rater: Rater = NO_RATER) -> bool:
        """Record a rating; False if (completion_id, user_id) already had one (the first is kept)."""

    @abstractmethod
    def add_preference(self, chosen_completion_id: str, rejected_completion_id: str, user_id: str,
                       rater: Rater = NO_RATER) -> bool:
        """Record a preference; False on a repeat of (chosen, rejected, user_id)."""

    @abstractmethod
    def add_ranking(self, completion_ids: Sequence[str], user_id: str, rater: Rater = NO_RATER) -> bool:
        """Record a ranking (best first) of completions of one prompt; False if this user already ranked
        these completions, in any order (the first is kept)."""

    @abstractmethod
    def list_completions(self, after_created_at: float = 0.0, limit: int | None = None) -> list[CompletionRecord]:
        """Completions created after a time, oldest first."""

    @abstractmethod
    def list_feedback(self, after_seq: int = 0, limit: int | None = None, *, newest: bool = False,
                      seqs: Sequence[int] | None = None) -> list[FeedbackRecord]:
        """Feedback with seq > after_seq, in seq order.

        `newest`: the newest `limit` of them (still returned in seq order), where a reader starts with a
        window. `seqs`: only the rows holding these seqs (after_seq and limit ignored): where a reader
        asks again for rows that committed after later ones (store.tail).
        """

    @abstractmethod
    def list_preferences(self, after_seq: int = 0, limit: int | None = None, *, newest: bool = False,
                         seqs: Sequence[int] | None = None) -> list[PreferenceRecord]:
        """Preferences with seq > after_seq, in seq order (see list_feedback)."""

    @abstractmethod
    def list_rankings(self, after_seq: int = 0, limit: int | None = None, *, newest: bool = False,
                      seqs: Sequence[int] | None = None) -> list[RankingRecord]:
        """Rankings with seq > after_seq, in seq order (see list_feedback)."""

    @abstractmethod
    def rating_evidence(self, completion_ids: Iterable[str]) -> dict[str, RatingEvidence]:
        """The users' ratings of these completions; ids nobody rated are left out."""

    @abstractmethod
    def compare_versions(self, a: str, b: str, after_created_at: float = 0.0,
                         same_users: bool = False) -> VersionComparison:
        """Thumbs on each version's completions created after a time (b's only from a's users with
        `same_users`), and preferences between the two."""

    @abstractmethod
    def add_api_key(self, key: ApiKeyRecord) -> None:
        """Store a new key (InvalidArgument if its id exists)."""

    @abstractmethod
    def get_api_key(self, key_id: str) -> ApiKeyRecord | None:
        """The key with this id, revoked or not; None if there is none."""

    @abstractmethod
    def list_api_keys(self) -> list[ApiKeyRecord]:
        """Every key, oldest first."""

    @abstractmethod
    def revoke_api_key(self, key_id: str) -> bool:
        """Mark a key revoked from now on; False if it was already (NotFound if there is no such key)."""

    @abstractmethod
    def count_feedback(self, after_seq: int = 0) -> int:
        """Number of feedback rows with seq > after_seq."""

    @abstractmethod
    def count_preferences(self) -> int:
        """Number of preference rows."""

    @abstractmethod
    def count_rankings(self) -> int:
        """Number of rankings."""

    @abstractmethod
    def count_completions(self) -> int:
        """Number of completions."""

    @abstractmethod
    def schema_version(self) -> int:
        """The newest migration applied."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    def __enter__(self) -> Store:
        """Use the store in a `with` block; it is closed on exit."""
        return self

    def __exit__(self, *exc: Any) -> None:
        """Close on leaving the `with` block, whether or not it raised."""
        self.close()
