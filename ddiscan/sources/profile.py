"""A base profile (``*.ddiprofile``): stored subspaces and norms instead of the weights."""

from __future__ import annotations

from ..profile import Profile, is_profile
from ..sketch import Subspace


class ProfileSource:
    """Scores against a :class:`~ddiscan.profile.Profile`: nothing is widened, Q_t is read."""

    def __init__(self, profile: Profile):
        self.profile, self.path = profile, profile.path

    @classmethod
    def accept(cls, base, sketch):
        """A Profile, or a path ending in ``.ddiprofile``; None for any other base."""
        if isinstance(base, Profile):
            return cls(base)
        return cls(Profile(base)) if is_profile(base) else None

    def keys(self):
        return self.profile.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.profile

    def info(self, key: str):
        return self.profile.info(key)

    def order(self, keys) -> list[str]:
        return sorted(keys)

    def fetch(self, key: str):
        return None

    def load(self, key: str, fetched):
        return None, self.profile.norm(key)

    def basis(self, key: str, matrix, *, module, t: int, xp):
        """The stored top-t basis (the right one for a transposed weight), with the gap and
        error bar its stored Ritz values give (None from a version 1 profile)."""
        basis = self.profile.basis(key, transposed=module.transpose_base, t=t)
        return Subspace(xp.asarray(basis), *self.profile.error_bar(key, transposed=module.transpose_base, t=t))

    def settle(self, parameters: dict) -> tuple[dict, list[str]]:
        """The profile's own sketch parameters replace the scan's (its subspaces are used
        as they were sketched), with a note when they differ, and one when the profile
        (version 1) has no error bars."""
        stored = self.profile.parameters
        given = {name: parameters[name] for name in stored}
        notes = [] if given == stored else [
            f"the profile was sketched with {stored}; its subspaces are used as they are"]
        if self.profile.meta["version"] < 2:
            notes.append("the base profile has no error bars (written before ddiscan stored them: gap and "
                         "deviation_error are null); rebuild it with `ddiscan profile`")
        return {**parameters, **stored}, notes

    def describe(self) -> dict:
        return self.profile.describe()

    def quantization(self, key: str) -> dict | None:
        """How the profiled base's W0 was dequantized, as the profile recorded it."""
        return self.profile.weights[key].get("quantization")
