"""benchmarks.memory's bookkeeping: which settings a record is, and how the table names them.

(The compiles themselves are minutes of the full 2B config: a benchmark, not a test; one
setting is compiled here on a tiny model.)
"""

import pytest

from benchmarks import memory


def _record(method, second_order=None, **kw):
    r = {"method": method, "T": 5, "remat": "full", "devices": 8, "argument_bytes": 3 * 2**30,
         "output_bytes": 2**30, "alias_bytes": 2**30, "temp_bytes": 10 * 2**30, "peak_bytes": 13 * 2**30,
         "fits": True, "compile_s": 1.0}
    if second_order is not None:
        r["second_order"] = second_order
    r.update(kw)
    return r


def test_key_reads_old_records_as_reverse_and_ignores_second_order_elsewhere():
    assert memory._key(_record("exact")) == ("exact", 5, "full", 8, "reverse", "?")  # written before the options
    assert memory._key(_record("exact_lowmem", "mixed", inner_scan="loop")) == ("exact_lowmem", 5, "full", 8, "mixed",
                                                                                 "loop")
    assert memory._key(_record("darts", "-", inner_scan="unrolled")) == ("darts", 5, "full", 8, "-", "unrolled")
    assert memory._key(_record("darts")) == ("darts", 5, "full", 8, "-", "?")


def test_table_names_the_second_order_of_each_row():
    table = memory.format_table([_record("exact"), _record("exact", "mixed", inner_scan="loop"), _record("darts", "-"),
                                 {"method": "exact", "T": 5, "remat": "full", "devices": 1,
                                  "second_order": "mixed", "error": "RESOURCE_EXHAUSTED"}], 80.0)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["method", "2nd", "scan"]
    assert lines[2].split()[:3] == ["exact", "reverse", "?"] and lines[2].split()[-3:] == ["13.00", "yes", "1.0"]
    assert lines[3].split()[:3] == ["exact", "mixed", "loop"]
    assert lines[4].split()[:2] == ["darts", "-"]
    assert lines[5].split()[:2] == ["exact", "mixed"] and "error: RESOURCE_EXHAUSTED" in lines[5]


def test_parser_takes_lists_and_defaults_to_what_the_2b_preset_trains():
    args = memory._parser().parse_args(["--second-order", "reverse,mixed", "--inner-scan", "loop,unrolled"])
    assert memory._strs(args.second_order) == ["reverse", "mixed"]
    assert memory._strs(args.inner_scan) == ["loop", "unrolled"]
    defaults = memory._parser().parse_args([])
    assert (defaults.second_order, defaults.inner_scan) == ("mixed", "unrolled")


def test_options_name_the_method_and_refuse_what_other_flags_set():
    assert memory.parse_options('{"in_place": true}') == {"in_place": True}
    rec = _record("exact_reversible", "mixed", inner_scan="loop", method_options={"in_place": True})
    assert memory.method_label(rec) == "exact_reversible[in_place=true]"
    assert memory._key(rec)[0] == "exact_reversible[in_place=true]"
    lines = memory.format_table([rec, _record("darts", "-")], 80.0).splitlines()
    assert lines[2].split()[0] == "exact_reversible[in_place=true]"
    assert lines[0].index("2nd") == lines[2].index("mixed") == lines[3].index("-")  # the column widens to the label
    assert memory.method_label(_record("exact_reversible", method_options={})) == "exact_reversible"
    for bad in ('{"second_order": "reverse"}', "[1]", "{"):
        with pytest.raises(ValueError, match="--options"):
            memory.parse_options(bad)


def test_weighting_names_the_record_and_an_instance_table_setting_compiles(monkeypatch):
    from dreamprm_jax.models import qwen2_vl

    args = memory._parser().parse_args(["--weighting", "instance_table", "--num-records", "50", "--seq-len", "32",
                                        "--image-side", "28", "--meta-steps", "2", "--domains", "3"])
    assert memory._strs(args.weighting) == ["instance_table"] and memory._parser().parse_args([]).weighting == "domain"
    monkeypatch.setattr(memory, "model_config", lambda a, remat: qwen2_vl.demo(
        hidden_size=16, num_hidden_layers=1, vision_depth=1, remat=remat))
    rec = memory.measure(args, "darts", 1, "none", 1, inner_scan="loop", weighting="instance_table")
    assert (rec["weighting"], rec["num_records"]) == ("instance_table", 50) and rec["peak_bytes"] > 0
    assert memory.method_label(rec) == "darts/instance_table" and memory._key(rec)[0] == "darts/instance_table"
    assert memory.method_label(_record("darts")) == "darts"  # written before --weighting: domain
    assert memory.format_table([rec], 80.0).splitlines()[2].split()[0] == "darts/instance_table"
