"""What a compiled XLA program needs in device memory (``compiled.memory_analysis()``)."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["CompiledMemory", "compiled_memory"]


class CompiledMemory(NamedTuple):
    """Bytes per device of one compiled program.

    ``peak_bytes = argument + output - alias + temp``: arguments and outputs live together,
    except donated (aliased) buffers, which are counted once; generated code is not counted.
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    peak_bytes: int


def compiled_memory(compiled: Any) -> CompiledMemory | None:
    """Summary of ``compiled.memory_analysis()``; ``None`` where the backend has none.

    A field the backend does not report counts as 0.
    """
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without an analysis raise various errors
        return None
    if analysis is None:
        return None

    def size(name: str) -> int:
        return int(getattr(analysis, f"{name}_size_in_bytes", 0) or 0)

    argument, output, alias, temp = size("argument"), size("output"), size("alias"), size("temp")
    return CompiledMemory(argument, output, alias, temp, size("generated_code"), argument + output - alias + temp)
