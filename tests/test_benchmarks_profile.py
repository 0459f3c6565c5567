"""benchmarks.profile_backward's bookkeeping: HLO instructions mapped to the Python source lines
that emitted them (the module's stack-frame tables)."""

from benchmarks import profile_backward

HLO = '''HloModule jit_f, is_scheduled=true

FileNames
1 "/work/dreamprm_jax/models/qwen2_vl/text.py"
2 "/work/dreamprm_jax/bilevel/inner.py"

FunctionNames
1 "dense"
2 "mixed_value_and_grad.<locals>.bwd"

FileLocations
1 {file_name_id=1 function_name_id=1 line=36 end_line=36 column=8 end_column=40}
2 {file_name_id=2 function_name_id=2 line=181 end_line=181 column=4 end_column=20}

StackFrames
1 {file_location_id=1 parent_frame_id=2}
2 {file_location_id=2}

ENTRY %main {
  %dot.1 = f32[4,4]{1,0} dot(%a, %b), metadata={op_name="jit(f)/dot_general" stack_frame_id=1}
  ROOT %add.2 = f32[4,4]{1,0} add(%dot.1, %c), metadata={op_name="jit(f)/add" stack_frame_id=2}
  %copy.3 = f32[4,4]{1,0} copy(%add.2)
}
'''


def test_source_lines_name_file_line_and_function():
    lines = profile_backward._source_lines(HLO)
    assert lines == {"dot.1": "text.py:36 dense", "add.2": "inner.py:181 bwd"}  # copy.3 has no frame


def test_parser_options():
    a = profile_backward._parser().parse_args(["--target", "step", "--by-line", "--no-pack-meta"])
    assert a.by_line and not a.pack_meta and not a.by_count
