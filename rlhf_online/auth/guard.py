"""The checks every rating, preference and ranking passes before the store records it.

Rate limits first (per user, and per API key when the caller has one), then, with authentication
on, that the caller may rate these completions: a key of role `user` only those served to the
same tenant and end user; an `annotator` key anything (recorded as such). With authentication off
there is no identity to check, and every caller may rate every completion, as before keys existed.
"""

from __future__ import annotations

from collections.abc import Mapping

from rlhf_online import metrics
from rlhf_online.auth.keys import Identity
from rlhf_online.auth.limits import RateLimiter
from rlhf_online.errors import PermissionDenied, ResourceExhausted
from rlhf_online.store import NO_RATER, Rater, Store


class FeedbackGuard:
    """Rate limits and the served-to check; `check` returns how the store records the rater."""

    def __init__(self, store: Store, per_user: RateLimiter | None = None, per_key: RateLimiter | None = None) -> None:
        self.store = store
        self.per_user = per_user or RateLimiter(0, 1)
        self.per_key = per_key or RateLimiter(0, 1)

    def check(self, identity: Identity | None, user_id: str, completions: Mapping[str, str]) -> Rater:
        """Raise unless this caller may rate these completions now; `completions` maps field name -> id."""
        tenant = identity.tenant if identity else ""
        if not self.per_user.allow((tenant, user_id)):
            metrics.FEEDBACK_REFUSED.labels("user_rate_limit").inc()
            raise ResourceExhausted(f"user_id: feedback rate limit of user {user_id!r} reached "
                                    f"({self.per_user.rate:g}/s); retry later")
        if identity is not None and not self.per_key.allow(identity.key_id):
            metrics.FEEDBACK_REFUSED.labels("key_rate_limit").inc()
            raise ResourceExhausted(f"x-api-key: feedback rate limit of API key {identity.key_id} reached "
                                    f"({self.per_key.rate:g}/s); retry later")
        if identity is None:
            return NO_RATER
        if not identity.annotator:
            found = self.store.get_completions(completions.values())
            for field, cid in completions.items():
                c = found.get(cid)  # an unknown id is the store's NOT_FOUND, raised when it records
                if c is not None and (c.tenant != identity.tenant or c.user_id != user_id):
                    metrics.FEEDBACK_REFUSED.labels("not_served_to_caller").inc()
                    raise PermissionDenied(f"{field}: completion {cid!r} was not served to user {user_id!r} of "
                                           "this API key's tenant; only an annotator key may rate it")
        return identity.rater
