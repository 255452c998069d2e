"""Tables from results.json files: layout, derived columns and missing cells."""

from __future__ import annotations

from pathlib import Path

from cbq.report import csv_text, load_results, main, markdown, pivot
from cbq.results import write_json_atomic


def record(tmp: Path, name: str, model: str, method: str, quant: str, ppl: float | None) -> None:
    payload = {
        "status": "finished" if ppl is not None else "failed",
        "metrics": {} if ppl is None else {"ppl/wiki-sample": ppl},
        "config": {"model": {"name": model}, "method": {"name": method}, "quant": {"name": quant}},
    }
    write_json_atomic(tmp / name / "results.json", payload)


def test_pivot_puts_fp_in_its_own_column_and_marks_missing_cells(tmp_path, capsys):
    record(tmp_path, "0", "smol", "fp", "w4a16", 21.5)
    record(tmp_path, "1", "smol", "rtn", "w4a16", 39.0)
    record(tmp_path, "2", "gemma", "rtn", "w2a16g64", 123456.0)
    record(tmp_path, "3", "gemma", "rtn", "w4a16", None)  # failed: shown as missing
    header, body = pivot(load_results(tmp_path), ["model.name"], "setting", "ppl/wiki-sample")
    assert header == ["model", "fp", "w4a16", "w2a16g64"]
    assert body == [["smol", "21.50", "39.00", "-"], ["gemma", "-", "-", "1.23e+05"]]
    assert markdown(header, body).splitlines()[2] == "| smol | 21.50 | 39.00 | - |"
    assert csv_text(header, body).splitlines()[1] == "smol,21.50,39.00,-"
    main([str(tmp_path), "--rows", "model.name", "method.name", "--cols", "quant.name"])
    printed = capsys.readouterr().out
    assert "| gemma | rtn | - | 1.23e+05 |" in printed
