"""Window-shape arithmetic for model ``check`` hooks: which windows a network can take.

Pure Python (no torch) so that ``vlab validate`` stays fast. A network that downsamples an axis
n times by 2 needs that side to be a multiple of 2**n; some also need a minimum size.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

Shape3 = tuple[int, int, int]


def valid_sides(side: int, multiple: int, minimum: int = 1) -> tuple[int | None, int]:
    """The nearest sides at or below and at or above ``side`` that are multiples of ``multiple``
    and at least ``minimum`` (the lower one is None when there is none)."""
    lower = side // multiple * multiple
    upper = max(-(-side // multiple), -(-minimum // multiple), 1) * multiple
    return (lower if lower >= max(minimum, 1) else None), upper


def nearest_valid_windows(window: Sequence[int], multiples: Sequence[int],
                          minimums: Sequence[int] = (1, 1, 1)) -> list[Shape3]:
    """Up to two valid windows near ``window``: each side rounded down where it can be, and each
    side rounded up."""
    pairs = [valid_sides(s, m, lo) for s, m, lo in zip(window, multiples, minimums)]
    down = tuple(lower if lower is not None else upper for lower, upper in pairs)
    up = tuple(upper for _, upper in pairs)
    return [down] if down == up else [down, up]


def fits(window: Sequence[int], multiples: Sequence[int], minimums: Sequence[int] = (1, 1, 1)) -> bool:
    return all(s % m == 0 and s >= lo for s, m, lo in zip(window, multiples, minimums))


def window_problems(windows: dict[str, Shape3], multiples: Sequence[int],
                    minimums: Sequence[int] = (1, 1, 1), network: str = "this network") -> Iterator[str]:
    """A message for each named window (e.g. "data.window") that ``network`` cannot take."""
    seen = set()
    for key, window in windows.items():
        window = tuple(int(s) for s in window)
        if window in seen or fits(window, multiples, minimums):
            continue
        seen.add(window)
        rule = _rule(multiples, minimums)
        options = " or ".join(str(list(w)) for w in nearest_valid_windows(window, multiples, minimums))
        yield (f"{key} = {list(window)} cannot be taken by {network}, which needs {rule}. "
               f"The nearest valid windows are {options}; set {key} to one of them.")


def _rule(multiples: Sequence[int], minimums: Sequence[int]) -> str:
    """E.g. "every side a multiple of 32 and at least 64" or "H a multiple of 16, W a multiple of 16"."""
    def axis_rule(multiple: int, minimum: int) -> str:
        rule = f"a multiple of {multiple}" if multiple > 1 else "any size"
        return rule + (f" and at least {minimum}" if minimum > multiple else "")

    if len(set(zip(multiples, minimums))) == 1:
        return "every side " + axis_rule(multiples[0], minimums[0])
    return ", ".join(f"{axis} {axis_rule(m, lo)}" for axis, m, lo in zip("DHW", multiples, minimums)
                     if m > 1 or lo > 1)


def spec_windows(spec: Any) -> dict[str, Shape3]:
    """The windows a model will see: the training window and, when set, the inference window."""
    windows = {"data.window": tuple(spec.data.window)}
    if spec.inference.window is not None:
        windows["inference.window"] = tuple(spec.inference.window)
    return windows
