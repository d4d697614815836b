"""SwiftKV settings: which layers keep their own KV and which share SingleInputKV/AcrossKV."""

from __future__ import annotations

from dataclasses import dataclass


def _divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


@dataclass(frozen=True)
class SwiftKVConfig:
    """SwiftKV layout of an ``L``-layer model.

    Layers ``0 .. l-1`` are unchanged; layers ``l .. L-1`` take K/V from the residual stream that
    enters layer ``l`` (SingleInputKV), and groups of ``G`` consecutive later layers share one K/V
    (AcrossKV). ``l == L`` is the original model.

    A *KV owner* is a slot in the KV cache: each of the first ``l`` layers, and each AcrossKV
    group of later layers.
    """

    num_layers: int  # L
    num_key_value_layers: int  # l
    key_value_group_size: int = 1  # G

    def __post_init__(self) -> None:
        L, l, g = self.num_layers, self.num_key_value_layers, self.key_value_group_size
        if not isinstance(l, int) or not 0 < l <= L:
            raise ValueError(
                f"num_key_value_layers must satisfy 0 < l <= L = {L} (the model's layer count); "
                f"got {l}. Use e.g. {L // 2} for 50% SingleInputKV."
            )
        if not isinstance(g, int) or g < 1:
            raise ValueError(f"key_value_group_size must be an integer >= 1; got {g}.")
        if (L - l) % g != 0:
            valid_g = _divisors(L - l)
            valid_l = [x for x in range(1, L + 1) if (L - x) % g == 0]
            raise ValueError(
                f"key_value_group_size G={g} must divide the number of later layers L - l = "
                f"{L} - {l} = {L - l}. Valid G for l={l}: {valid_g}; valid l for G={g}: {valid_l}."
            )

    @classmethod
    def baseline(cls, num_layers: int) -> SwiftKVConfig:
        """The original model: every layer owns its KV."""
        return cls(num_layers, num_layers, 1)

    @classmethod
    def from_fraction(cls, num_layers: int, fraction: float, group_size: int = 1) -> SwiftKVConfig:
        """``fraction`` of the layers become SwiftKV layers (paper's "SwiftKV 50%")."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"swiftkv fraction must be in [0, 1); got {fraction}.")
        later = round(num_layers * fraction)
        if later == 0:
            raise ValueError(f"swiftkv fraction {fraction} of {num_layers} layers rounds to no SwiftKV layer; use a "
                             f"fraction >= {0.5 / num_layers:.3g} (or -l/--num-key-value-layers < {num_layers}).")
        if later % group_size:
            lo, hi = later - later % group_size, later - later % group_size + group_size
            ok = [f"{x / num_layers:.3g} (l = {num_layers - x})" for x in (lo, hi) if 0 < x < num_layers]
            raise ValueError(f"swiftkv fraction {fraction} of {num_layers} layers gives {later} SwiftKV layers, which "
                             f"AcrossKV G={group_size} does not divide; use {' or '.join(ok) or 'a smaller G'}.")
        return cls(num_layers, num_layers - later, group_size)

    @property
    def is_baseline(self) -> bool:
        return self.num_key_value_layers == self.num_layers

    @property
    def num_kv_owners(self) -> int:
        l, g = self.num_key_value_layers, self.key_value_group_size
        return l + (self.num_layers - l) // g

    def kv_owner(self, layer: int) -> int:
        """Index of the KV-cache slot that ``layer`` reads (and, if it owns it, writes)."""
        l = self.num_key_value_layers
        return layer if layer < l else l + (layer - l) // self.key_value_group_size

    def is_swiftkv_layer(self, layer: int) -> bool:
        return layer >= self.num_key_value_layers

    def is_group_leader(self, layer: int) -> bool:
        """True for the later layer that owns ``k/v_proj_swiftkv`` of its AcrossKV group."""
        l = self.num_key_value_layers
        return layer >= l and (layer - l) % self.key_value_group_size == 0

    @property
    def group_leaders(self) -> list[int]:
        return [i for i in range(self.num_key_value_layers, self.num_layers) if self.is_group_leader(i)]

    @property
    def kv_bytes_ratio(self) -> float:
        """KV bytes per token relative to the original model: ``(l + (L-l)/G) / L``."""
        return self.num_kv_owners / self.num_layers


@dataclass(frozen=True)
class LayoutRequest:
    """The SwiftKV layout a user asks for before the model's layer count is known: ``l`` itself, or the
    fraction of layers made SwiftKV, or neither (half the layers, rounded down to whole AcrossKV groups);
    and the AcrossKV group size ``G``."""

    num_key_value_layers: int | None = None
    fraction: float | None = None
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.num_key_value_layers is not None and self.fraction is not None:
            raise ValueError("give num_key_value_layers (l) or a SwiftKV fraction, not both")

    def for_layers(self, num_layers: int) -> SwiftKVConfig:
        """The layout of an ``num_layers``-layer model (``ValueError`` where it cannot have it)."""
        g = self.group_size
        if self.num_key_value_layers is not None:
            return SwiftKVConfig(num_layers, self.num_key_value_layers, g)
        if self.fraction is None:
            later = num_layers // 2 - (num_layers // 2) % g
            return SwiftKVConfig(num_layers, num_layers - later, g)
        return SwiftKVConfig.from_fraction(num_layers, self.fraction, g)
