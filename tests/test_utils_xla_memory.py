"""The one summary of compiled.memory_analysis()."""

import jax
import jax.numpy as jnp

from dreamprm_jax.utils.xla_memory import CompiledMemory, compiled_memory


def test_peak_counts_arguments_outputs_and_temporaries():
    compiled = jax.jit(lambda x: (x * 2.0).sum()).lower(jnp.ones((256,), jnp.float32)).compile()
    mem = compiled_memory(compiled)
    assert isinstance(mem, CompiledMemory)
    assert mem.argument_bytes == 256 * 4 and mem.output_bytes == 4
    assert mem.peak_bytes == mem.argument_bytes + mem.output_bytes - mem.alias_bytes + mem.temp_bytes


def test_backend_without_analysis_gives_none():
    class NoAnalysis:
        def memory_analysis(self):
            raise NotImplementedError

    class Empty:
        def memory_analysis(self):
            return None

    assert compiled_memory(NoAnalysis()) is None and compiled_memory(Empty()) is None
