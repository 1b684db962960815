"""``policy=``, ``trust=`` and ``allow=``: one rule for what every front end's pickles may import.

``policy`` is the full value (:class:`~torchckpt.read.unpickle.policy.Policy`); ``trust`` and
``allow`` are shorthands for the common cases. Giving both a policy and a shorthand is an error,
so no front end has to guess which one wins.
"""

from __future__ import annotations

from typing import Iterable

from .unpickle.policy import Policy

__all__ = ["Policy", "resolve_policy"]


def resolve_policy(policy: Policy | None = None, trust: bool = False,
                   allow: Iterable[str] | str | None = None) -> Policy:
    """The policy a front end reads with: ``policy`` as given, or one made from ``trust``/``allow``."""
    if policy is None:
        return Policy.make(trust, allow)
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a torchckpt.Policy, not {type(policy).__name__}")
    if trust or allow:
        raise ValueError("pass either policy= or the trust=/allow= shorthands, not both "
                         "(e.g. Policy.make(trust=..., allow=...))")
    return policy
