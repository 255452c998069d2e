"""Tables from results.json files: layout, derived columns and missing cells; the paper
tables' layouts and the plots, on synthetic runs."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import pytest

from cbq.report import (
    build_table,
    csv_text,
    load_many,
    load_results,
    main,
    mark_best,
    markdown,
    matching,
    pivot,
    rounding_label,
    setting,
    table_csv,
    table_markdown,
)
from cbq.report.plots import (
    kl_share,
    loss_balance_figures,
    run_labels,
    window_loss_figures,
    write_plots,
)
from cbq.results import ResultRecord, archive, write_json_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


# --- synthetic runs of the paper tables ----------------------------------------------------

QUANTS = {
    "w4a16": (4, 16, None),
    "w2a16g64": (2, 16, 64),
    "w3a16g128": (3, 16, 128),
    "w8a8": (8, 8, None),
    "w4a8": (4, 8, None),
    "w4a4": (4, 4, None),
}


def run(
    method: str = "cbq",
    quant: str = "w8a8",
    *,
    model: str = "smol",
    ppl: dict[str, float] | None = None,
    status: str = "finished",
    table: int | None = None,
    window: tuple[int, int] = (2, 1),
    loss: tuple[str, bool] = ("l2_kl", True),
    cfp: str = "weight_act",
    rounding: tuple[str, int] = ("adaround", 5),
    **extra: Any,
) -> dict[str, Any]:
    """A results.json payload; ``extra`` adds top-level keys (stats, timing_s, memory)."""
    w_bits, a_bits, group = QUANTS[quant]
    metrics = {f"ppl/{corpus}": value for corpus, value in (ppl or {}).items()}
    return {
        "status": status,
        "metrics": metrics | extra.pop("metrics", {}),
        "config": {
            "model": {"name": model},
            "method": {"name": method, "epochs": 2, "batch_size": 4},
            "quant": {"name": quant, "w_bits": w_bits, "a_bits": a_bits, "w_group_size": group},
            "data": {"eval": list(ppl or ["wiki"]), "n_samples": 10},
            "window": {"size": window[0], "overlap": window[1]},
            "loss": {"kind": loss[0], "homologous": loss[1]},
            "cfp": {"mode": cfp, "distance": "mean", "log_space": False},
            "rounding": {"kind": rounding[0], "rank": rounding[1]},
            "experiment": {"name": None if table is None else f"table{table}", "table": table},
        },
        **extra,
    }


class Sweep:
    """Writes runs as ``<root>/<n>/results.json`` with increasing modification times, so
    that the read order (oldest first) is the write order."""

    clock = 1_700_000_000.0  # shared: runs of several sweeps are ordered too

    def __init__(self, root: Path):
        self.root, self.count = root, 0

    def add(self, payload: dict[str, Any]) -> Sweep:
        path = self.root / str(self.count) / "results.json"
        write_json_atomic(path, payload)
        Sweep.clock += 1
        os.utime(path, (Sweep.clock, Sweep.clock))
        self.count += 1
        return self


def rows(table) -> list[list[str]]:
    """The table's cells as printed in CSV (row labels repeated, no grouping)."""
    return list(csv.reader(io.StringIO(table_csv(table))))


def test_table1_zero_shot_columns_in_percent_then_perplexity_and_footer(tmp_path):
    zeroshot = {
        "zeroshot/cbq_hellaswag_wiki/acc": 0.25,
        "zeroshot/cbq_hellaswag_wiki/acc_norm": 0.3,
        "zeroshot/cbq_hellaswag_wiki/acc_stderr": 0.01,
        "zeroshot/cbq_lambada_wiki/acc,none": 0.125,
    }
    stats = {
        "zeroshot/skipped": {},
        "zeroshot/cbq_hellaswag_wiki/n_examples": 200,
        "zeroshot/cbq_hellaswag_wiki/chance_acc": 0.25,
        "zeroshot/cbq_hellaswag_wiki/acc_stderr": 0.03,
        "zeroshot/cbq_lambada_wiki/n_examples": 150,
        "zeroshot/cbq_lambada_wiki/chance_acc": "~0 (open vocabulary)",
    }
    Sweep(tmp_path).add(run("rtn", "w4a16", ppl={"wiki": 40.0}, metrics=zeroshot)).add(
        run("fp", "w4a16", ppl={"wiki": 20.0}, metrics=zeroshot, stats=stats)
    ).add(run("cbq", "w4a4", status="skipped"))
    table = build_table(load_results(tmp_path), 1)
    assert rows(table) == [
        [
            *("model", "setting", "method"),
            *("cbq_hellaswag_wiki acc", "cbq_hellaswag_wiki acc_norm", "cbq_lambada_wiki acc"),
            "ppl wiki",
        ],
        ["smol", "fp", "fp", "25.00", "30.00", "12.50", "20.00"],
        ["smol", "w4a16", "rtn", "25.00", "30.00", "12.50", "40.00"],
    ]
    assert table.footer == [
        "Zero-shot examples: cbq_hellaswag_wiki: 200 examples, chance 25.0%; "
        "cbq_lambada_wiki: 150 examples, chance ~0 (open vocabulary)"
    ]
    assert table_markdown(table).endswith(table.footer[0])


def test_table2_rows_corpus_setting_method_columns_models(tmp_path):
    Sweep(tmp_path).add(run("fp", "w4a16", ppl={"c4": 15.0, "wiki": 14.0})).add(
        run("rtn", "w4a16", ppl={"c4": 19.0, "wiki": 18.0})
    ).add(run("rtn", "w4a16", ppl={"c4": 17.0, "wiki": 16.0})).add(  # replaces the run above
        run("cbq", "w2a16g64", model="big", status="failed", ppl={"c4": 1.0})
    ).add(run("cbq", "w4a16", model="big", status="skipped", ppl={"c4": 5.0}))
    table = build_table(load_results(tmp_path), 2)
    assert rows(table) == [
        ["corpus", "setting", "method", "smol", "big"],
        ["c4", "fp", "fp", "15.00", "-"],
        ["c4", "w4a16", "rtn", "17.00", "-"],
        ["c4", "w2a16g64", "cbq", "-", "failed"],
        ["wiki", "fp", "fp", "14.00", "-"],
        ["wiki", "w4a16", "rtn", "16.00", "-"],
    ]
    lines = table_markdown(table).splitlines()
    assert lines[0] == "Table 2: perplexity per corpus, setting and method"
    assert "|  | w4a16 | rtn | 17.00 | - |" in lines  # repeated labels left blank
    assert "| wiki | fp | fp | 14.00 | - |" in lines


def test_a_failed_run_never_replaces_a_finished_one(tmp_path):
    Sweep(tmp_path).add(run("rtn", "w4a16", ppl={"wiki": 30.0})).add(
        run("rtn", "w4a16", ppl={"wiki": 1.0}, status="failed")
    ).add(run("rtn", "w8a8", ppl={"wiki": 1.0}, status="running"))
    assert rows(build_table(load_results(tmp_path), 2))[1:] == [["wiki", "w4a16", "rtn", "30.00"]]


def test_table3_columns_method_and_cbq_window(tmp_path):
    Sweep(tmp_path).add(run("omniquant_cpu", "w4a16", ppl={"wiki": 30.0})).add(
        run("cbq", "w4a16", ppl={"wiki": 26.0}, window=(1, 0))
    ).add(run("cbq", "w4a16", ppl={"wiki": 25.0})).add(run("cbq", "w4a4", ppl={"wiki": 90.0})).add(
        run("cbq", "w4a16", ppl={"wiki": 1.0}, rounding=("nearest", 5))  # off reference
    )
    assert rows(build_table(load_results(tmp_path), 3)) == [
        ["corpus", "model", "setting", "omniquant_cpu", "cbq K=1", "cbq K=2 ov1"],
        ["wiki", "smol", "w4a16", "30.00", "26.00", "25.00"],
        ["wiki", "smol", "w4a4", "-", "-", "90.00"],
    ]


def table4_sweep(root: Path) -> Sweep:
    sweep = Sweep(root)
    for (size, overlap), value in {(2, 1): 16.2, (1, 0): 16.5, (4, 2): 16.1, (2, 0): 16.3}.items():
        sweep.add(
            run(
                window=(size, overlap),
                ppl={"wiki": value},
                table=4,
                timing_s={"quantize": 100.4 * size},
                memory={"peak_rss_mib": 2000.6, "process_peak_rss_mib": 2100.0},
            )
        )
    return sweep


def test_table4_rows_sorted_by_window_with_time_and_memory(tmp_path):
    sweep = table4_sweep(tmp_path)
    sweep.add(run("rtn", ppl={"wiki": 50.0}, table=4))  # not CBQ: not in the table
    sweep.add(run(window=(4, 0), ppl={"wiki": 1.0}, loss=("l2", False), table=4))  # off reference
    table = build_table(load_results(tmp_path), 4)
    group = "smol (w8a8)"
    assert rows(table) == [
        ["#blocks", "overlap", f"{group} wiki", f"{group} quantize (s)", f"{group} peak RSS (MiB)"],
        ["1", "0", "16.50", "100", "2001"],
        ["2", "0", "16.30", "201", "2001"],
        ["2", "1", "16.20", "201", "2001"],
        ["4", "2", "16.10", "402", "2001"],
    ]
    lines = table_markdown(table).splitlines()
    assert lines[0].endswith("— smol (w8a8)")
    assert lines[2] == "| #blocks | overlap | wiki | quantize (s) | peak RSS (MiB) |"
    assert lines[5:7] == ["| 2 | 0 | 16.30 | 201 | 2001 |", "|  | 1 | 16.20 | 201 | 2001 |"]


def test_table4_prefers_accelerator_memory_and_splits_groups_in_markdown(tmp_path):
    Sweep(tmp_path).add(
        run(ppl={"wiki": 16.0}, memory={"peak_rss_mib": 3000.0, "peak_cuda_mib": 1234.4})
    ).add(run(quant="w4a4", window=(1, 0), ppl={"wiki": 40.0}))
    table = build_table(load_results(tmp_path), 4)
    text = table_markdown(table)
    assert "— smol (w8a8)\n\n| #blocks | overlap | wiki | quantize (s) | peak CUDA (MiB) |" in text
    assert "| 2 | 1 | 16.00 | - | 1234 |" in text
    assert "— smol (w4a4)\n\n| #blocks | overlap | wiki | quantize (s) | peak RSS (MiB) |" in text
    assert "| 1 | 0 | 40.00 | - | - |" in text  # no timing or memory recorded


def test_table5_takes_its_default_row_from_table4s_sweep(tmp_path):
    losses = {("l2", False): 23.4, ("kl", False): 23.0, ("l2_kl", False): 22.4}
    table5 = Sweep(tmp_path / "table5")
    for loss, value in losses.items():
        table5.add(run(loss=loss, ppl={"wiki": value}, table=5, timing_s={"quantize": 60.0}))
    table4_sweep(tmp_path / "table4")
    records = load_many([tmp_path / "table5", tmp_path / "table4"])
    assert rows(build_table(records, 5)) == [
        ["KL", "L2", "homologous", "smol (w8a8) wiki", "smol (w8a8) quantize (s)"],
        ["✗", "✓", "✗", "23.40", "60"],
        ["✓", "✗", "✗", "23.00", "60"],
        ["✓", "✓", "✗", "22.40", "60"],
        ["✓", "✓", "✓", "16.20", "201"],  # the K=2, overlap 1 run of Table 4
    ]


def test_table6_rounding_steps_parameters_memory_time(tmp_path):
    windows = [{"blocks": [i, i + 2], "final_loss": 0.1} for i in range(3)]
    counts = {"adaround": 1000, "lora_r5": 50}
    common = {"timing_s": {"quantize": 9.6}, "memory": {"peak_rss_mib": 100.0}}
    sweep = Sweep(tmp_path)
    moved = {"nearest": {}, "adaround": {"0": [40, 1000]}, "lora": {"0": [15, 500], "1": [5, 500]}}
    for kind, value in {"nearest": 900.0, "adaround": 35.0, "lora": 33.0}.items():
        stats = {"windows": windows, "rounding_params_per_block": counts}
        stats["rounding_moved"] = moved[kind]
        sweep.add(run(quant="w4a4", rounding=(kind, 5), ppl={"wiki": value}, stats=stats, **common))
    steps = {"optimizer_steps": 77, "rounding_params_per_block": counts}
    sweep.add(run(rounding=("lora", 5), ppl={"wiki": 12.0}, stats=steps, **common))
    table = build_table(load_results(tmp_path), 6)
    assert rows(table)[0] == [
        "rounding",
        "setting",
        "smol wiki",
        "smol #iters",
        "smol rounding params/block",
        "smol weights moved (%)",
        "smol peak RSS (MiB)",
        "smol quantize (s)",
    ]
    # 3 windows x 2 epochs x ceil(10 samples / batches of 4) = 18 steps
    assert rows(table)[1:] == [
        ["nearest (no rounding learning)", "w4a4", "900.00", "18", "0", "0.00", "100", "10"],
        ["adaround (full rank)", "w4a4", "35.00", "18", "1000", "4.00", "100", "10"],
        ["lora r=5", "w4a4", "33.00", "18", "50", "2.00", "100", "10"],
        ["lora r=5", "w8a8", "12.00", "77", "50", "-", "100", "10"],
    ]
    assert table.footer[0].startswith("#iters: optimizer steps of the whole run")


def test_table7_cfp_mode_by_setting(tmp_path):
    sweep = Sweep(tmp_path)
    for quant in ("w4a4", "w8a8"):
        for mode, value in {"none": 45.9, "weight": 45.1, "weight_act": 38.2}.items():
            cut = {"none": {}, "weight": {"0": {"weight": {"q": 3, "k": 4}}}}.get(mode)
            stats = {} if cut is None else {"cfp": cut}
            sweep.add(
                run(quant=quant, cfp=mode, ppl={"wiki": value + (quant == "w8a8")}, stats=stats)
            )
    loggap = run(quant="w4a4", ppl={"wiki": 37.0})
    loggap["config"]["cfp"] |= {"distance": "gap", "log_space": True}
    sweep.add(loggap)
    migrated = run(quant="w4a4", ppl={"wiki": 30.0})
    migrated["config"]["cfp"] |= {"act_rule": "migrate"}
    sweep.add(migrated)
    grouped = run(quant="w4a4", cfp="weight", ppl={"wiki": 47.0})
    grouped["config"]["cfp"] |= {"weight_scope": "group", "clip_to": "reserved"}
    sweep.add(grouped)
    assert rows(build_table(load_results(tmp_path), 7)) == [
        ["cfp", "setting", "smol wiki", "smol truncated weights"],
        ["none", "w4a4", "45.90", "0"],
        ["none", "w8a8", "46.90", "0"],
        ["weight", "w4a4", "45.10", "7"],
        ["weight", "w8a8", "46.10", "7"],
        ["weight (per group, to reserved)", "w4a4", "47.00", "-"],
        ["weight_act", "w4a4", "38.20", "-"],
        ["weight_act", "w8a8", "39.20", "-"],
        ["weight_act (gap, log)", "w4a4", "37.00", "-"],
        ["weight_act (migrate)", "w4a4", "30.00", "-"],
    ]


def test_cli_table_csv_over_several_roots(tmp_path, capsys):
    Sweep(tmp_path / "a").add(run("fp", "w4a16", ppl={"wiki": 14.0}))
    Sweep(tmp_path / "b").add(run("rtn", "w4a16", ppl={"wiki": 16.0}))
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--table", "2", "--csv"])
    assert capsys.readouterr().out.splitlines() == [
        "corpus,setting,method,smol",
        "wiki,fp,fp,14.00",
        "wiki,w4a16,rtn,16.00",
    ]
    main([str(tmp_path / "a"), "--table", "4"])
    assert "(no finished or failed runs for this table)" in capsys.readouterr().out


def test_cli_rejects_roots_without_runs(tmp_path):
    with pytest.raises(SystemExit, match=r"no results\.json"):
        main([str(tmp_path), "--table", "2"])


def test_plots_are_written_as_png(tmp_path, capsys):
    sweep = table4_sweep(tmp_path / "sweep")
    sweep.add(run("fp", ppl={"wiki": 14.0})).add(run("rtn", "w4a4", ppl={"wiki": 90.0}))
    for size in (1, 2, 4):
        windows = [
            {"blocks": [b, b + size], "final_loss": 0.1 * (b + 1)} for b in range(0, 8, size)
        ]
        sweep.add(run(window=(size, 0), ppl={"wiki": 16.0 + size}, stats={"windows": windows}))
    main([str(tmp_path / "sweep"), "--table", "4", "--plots", str(tmp_path / "plots")])
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == ["ppl_vs_bits_smol.png", "window_loss_smol.png"]
    for name in written:
        png = (tmp_path / "plots" / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert "wrote" in capsys.readouterr().err


def test_window_loss_lines_by_block_when_schedules_differ_and_labels_what_varies(tmp_path):
    sweep = Sweep(tmp_path)
    for size in (1, 2):
        windows = [{"blocks": [b, b + size], "final_loss": 1.0} for b in range(0, 4, size)]
        sweep.add(run(window=(size, 0), stats={"windows": windows}, ppl={"wiki": 1.0}))
    records = load_results(tmp_path)
    assert run_labels(records) == ["window K=1", "window K=2"]
    (fig,) = window_loss_figures(records).values()
    (ax,) = fig.axes
    assert ax.get_xlabel() == "first block of the window"
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[0, 1, 2, 3], [0, 2]]
    assert ax.get_yscale() == "log"
    paths = write_plots(records, tmp_path / "plots")
    assert [p.name for p in paths] == ["window_loss_smol.png"]  # one setting: no ppl plot


def test_loss_balance_plots_the_kl_share_of_each_window(tmp_path):
    sweep = Sweep(tmp_path)
    terms = [({"l2": 3.0, "kl": 1.0}, {"l2": 1.0, "kl": 1.0}), ({"l2": 1.0, "kl": 0.0}, {})]
    windows = [
        {"blocks": [b, b + 2], "final_loss": 1.0, "loss_terms_init": i, "loss_terms_hard": h}
        for b, (i, h) in enumerate(terms)
    ]
    sweep.add(run(stats={"windows": windows}, ppl={"wiki": 1.0}))
    (fig,) = loss_balance_figures(load_results(tmp_path)).values()
    (ax,) = fig.axes
    hard, init = (list(line.get_ydata()) for line in ax.get_lines())
    assert init == [0.25, 0.0] and hard[0] == 0.5 and hard[1] is None  # no terms: a gap
    assert ax.get_lines()[0].get_color() == ax.get_lines()[1].get_color()
    assert kl_share({"l2": 1.0}) is None


def write_example_sweeps(root: Path) -> list[Path]:
    """Synthetic Table 4 and Table 5 sweeps (with an FP and an RTN run), for the results
    notebook's test; returns the two sweep dirs."""
    table4 = table4_sweep(root / "table4")
    table4.add(run("fp", ppl={"wiki": 14.0}, table=4)).add(run("rtn", "w4a4", ppl={"wiki": 90.0}))
    for size in (1, 2):
        windows = [
            {"blocks": [b, b + size], "final_loss": 0.1 * (b + 1)} for b in range(0, 4, size)
        ]
        table4.add(run(window=(size, 0), ppl={"wiki": 16.0}, stats={"windows": windows}, table=4))
    table5 = Sweep(root / "table5")
    for loss in (("l2", False), ("kl", False)):
        table5.add(run(loss=loss, ppl={"wiki": 20.0}, table=5))
    return [root / "table4", root / "table5"]


def test_example_sweeps_fill_tables_4_and_5(tmp_path):
    records = load_many(write_example_sweeps(tmp_path))
    assert len(build_table(records, 4).rows) == 4
    assert len(build_table(records, 5).rows) == 3


def test_ablation_rows_follow_the_papers_order_whatever_order_the_runs_ran_in(tmp_path):
    sweep = Sweep(tmp_path)
    for loss, value in {("l2_kl", True): 1.0, ("kl", False): 2.0, ("l2", False): 3.0}.items():
        sweep.add(run(loss=loss, ppl={"wiki": value}))
    sweep.add(run(loss=("l2_kl", False), ppl={"wiki": 4.0}))
    assert [row[:3] for row in rows(build_table(load_results(tmp_path), 5))[1:]] == [
        ["✗", "✓", "✗"],
        ["✓", "✗", "✗"],
        ["✓", "✓", "✗"],
        ["✓", "✓", "✓"],
    ]
    for table, component, kinds in (
        (6, "rounding", (("lora", 5), ("nearest", 5), ("adaround", 5))),
        (7, "cfp", ("weight_act", "none", "weight")),
    ):
        root = tmp_path / str(table)
        ablation = Sweep(root)
        for kind in kinds:
            ablation.add(run(quant="w4a4", ppl={"wiki": 1.0}, **{component: kind}))
        first = [row[0].split(" ")[0] for row in rows(build_table(load_results(root), table))[1:]]
        expected = (
            ["nearest", "adaround", "lora"] if table == 6 else ["none", "weight", "weight_act"]
        )
        assert first == expected


def test_pivot_keeps_a_cell_that_a_later_run_without_the_metric_does_not_have(tmp_path):
    Sweep(tmp_path).add(run("rtn", "w4a4", ppl={"wiki-sample": 1329.0}))
    Sweep(tmp_path / "later").add(run("rtn", "w4a4", ppl={"lee-news": 2147.0}))
    records = load_results(tmp_path)
    for metric, value in (("ppl/wiki-sample", "1329.00"), ("ppl/lee-news", "2147.00")):
        assert pivot(records, ["method.name"], "setting", metric)[1] == [["rtn", value]]


def _reset_file_times(root: Path) -> None:
    """What a git clone does: every file gets the same modification time."""
    for path in root.rglob("results.json"):
        os.utime(path, (1_000.0, 1_000.0))


def test_written_at_orders_runs_when_file_times_are_lost(tmp_path):
    sweep = Sweep(tmp_path / "sweep")
    sweep.add(
        run("rtn", "w4a4", ppl={"wiki-sample": 2000.0}, written_at="2026-01-02T00:00:00+00:00")
    )
    sweep.add(
        run("rtn", "w4a4", ppl={"wiki-sample": 1000.0}, written_at="2026-01-01T00:00:00+00:00")
    )
    _reset_file_times(tmp_path)
    body = pivot(load_results(tmp_path), ["method.name"], "setting", "ppl/wiki-sample")[1]
    assert body == [["rtn", "2000.00"]]  # the later stamp wins, though it was written first


def test_archive_copies_finished_runs_and_keeps_their_order_in_a_clone(tmp_path):
    sweep = Sweep(tmp_path / "multirun" / "bench")
    sweep.add(run("rtn", "w4a4", ppl={"wiki-sample": 1329.0}))  # older run, no stamp
    sweep.add(run("rtn", "w4a4", ppl={"wiki-sample": 1200.0}))
    sweep.add(run("gptq", "w4a4", ppl={"wiki-sample": 999.0}, status="running"))
    copied = archive([tmp_path / "multirun" / "bench"], tmp_path / "runs")
    assert sorted(str(p.relative_to(tmp_path / "runs")) for p in copied) == [
        "bench/0/results.json",
        "bench/1/results.json",
    ]
    _reset_file_times(tmp_path / "runs")
    body = pivot(load_results(tmp_path / "runs"), ["method.name"], "setting", "ppl/wiki-sample")
    assert body[1] == [["rtn", "1200.00"]]


def test_pivot_reads_time_and_memory_by_dotted_path(tmp_path):
    sweep = Sweep(tmp_path)
    sweep.add(run("rtn", "w4a16", timing_s={"quantize": 1.5}, memory={"peak_rss_mib": 900.0}))
    sweep.add(run("gptq", "w4a16", timing_s={"quantize": 42.25}, memory={"peak_rss_mib": 1024.0}))
    records = load_results(tmp_path)
    seconds = pivot(records, ["method.name"], "setting", "timing_s.quantize")
    assert seconds == (["method", "w4a16"], [["rtn", "1.50"], ["gptq", "42.25"]])
    rss = pivot(records, ["method.name"], "setting", "memory.peak_rss_mib")[1]
    assert rss == [["rtn", "900.00"], ["gptq", "1024.00"]]


def test_where_keeps_only_matching_runs_and_rejects_a_malformed_condition(tmp_path, capsys):
    sweep = Sweep(tmp_path)
    for method, quant, ppl in (
        ("rtn", "w4a16", 40.0),
        ("cbq", "w4a16", 30.0),
        ("cbq", "w8a8", 25.0),
    ):
        sweep.add(run(method, quant, ppl={"wiki-sample": ppl}))
    records = load_results(tmp_path)
    kept = matching(records, ["method.name=cbq", "setting=w4a16,w4a4"])
    assert [(r.config["method"]["name"], setting(r)) for r in kept] == [("cbq", "w4a16")]
    main([str(tmp_path), "--rows", "method.name", "--where", "setting=w8a8"])
    assert capsys.readouterr().out.splitlines()[2] == "| cbq | 25.00 |"
    main(
        [
            str(tmp_path),
            "--rows",
            "method.name",
            "--where",
            "method.name=rtn",
            "--where",
            "setting=w4a16,w8a8",
        ]
    )
    assert capsys.readouterr().out.splitlines()[2:] == ["| rtn | 40.00 |"]
    with pytest.raises(SystemExit, match=r"no results\.json matching model\.name=opt"):
        main([str(tmp_path), "--where", "model.name=opt"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        matching(records, ["method.name"])


def test_setting_columns_go_fp_weight_only_then_weight_act_most_bits_first(tmp_path):
    sweep = Sweep(tmp_path)
    for quant in ("w4a4", "w2a16g64", "w8a8", "w4a16", "w4a8", "w3a16g128"):
        sweep.add(run("rtn", quant, ppl={"wiki-sample": 50.0}))
    sweep.add(run("fp", "w4a16", ppl={"wiki-sample": 20.0}))
    header = pivot(load_results(tmp_path), ["method.name"], "setting", "ppl/wiki-sample")[0]
    assert header == ["method", "fp", "w4a16", "w3a16g128", "w2a16g64", "w8a8", "w4a8", "w4a4"]


def test_method_rows_in_method_order_and_best_value_in_bold(tmp_path, capsys):
    sweep = Sweep(tmp_path)
    for method, quant, ppl in (
        ("cbq", "w4a16", 28.7),
        ("awq", "w4a16", 30.8),
        ("newmethod", "w4a16", 35.0),
        ("rtn", "w4a16", 39.0),
        ("rtn", "w4a4", 1329.0),
        ("fp", "w4a16", 21.6),
    ):
        sweep.add(run(method, quant, ppl={"wiki-sample": ppl}))
    header, body = pivot(load_results(tmp_path), ["method.name"], "setting", "ppl/wiki-sample")
    assert [row[0] for row in body] == ["fp", "rtn", "awq", "cbq", "newmethod"]
    assert header == ["method", "fp", "w4a16", "w4a4"]
    # fp and w4a4 have a single number each: nothing to compare, nothing marked.
    assert mark_best(body, 1, "min") == [
        ["fp", "21.60", "-", "-"],
        ["rtn", "-", "39.00", "1329.00"],
        ["awq", "-", "30.80", "-"],
        ["cbq", "-", "**28.70**", "-"],
        ["newmethod", "-", "35.00", "-"],
    ]
    assert mark_best(body, 1, "max")[1][2] == "**39.00**"
    main([str(tmp_path), "--rows", "method.name", "--best", "min"])
    assert "| cbq | - | **28.70** | - |" in capsys.readouterr().out.splitlines()


def at_method_defaults(record: dict) -> dict:
    record["config"]["method"] = {"name": record["config"]["method"]["name"]}
    return record


def test_variant_rows_name_cbq_components_that_differ_from_the_paper(tmp_path, capsys):
    sweep = Sweep(tmp_path)
    sweep.add(at_method_defaults(run("cbq", "w4a4", ppl={"wiki-sample": 680.0})))
    migrated = at_method_defaults(run("cbq", "w4a4", ppl={"wiki-sample": 84.9}))
    migrated["config"]["cfp"]["act_rule"] = "migrate"
    sweep.add(migrated)
    window_k1 = run("cbq", "w4a4", window=(1, 0), loss=("l2", False), ppl={"wiki-sample": 700.0})
    sweep.add(at_method_defaults(window_k1))
    relative = at_method_defaults(run("cbq", "w4a4", ppl={"wiki-sample": 650.0}))
    relative["config"]["loss"]["l2_relative"] = True
    sweep.add(relative)
    sweep.add(at_method_defaults(run("osplus", "w4a4", cfp="none", ppl={"wiki-sample": 169.4})))
    bf16_scored = at_method_defaults(run("osplus", "w4a4", cfp="none", ppl={"wiki-sample": 170.1}))
    bf16_scored["config"]["eval"] = {"dtype": "bfloat16"}
    sweep.add(bf16_scored)
    act_order = at_method_defaults(run("gptq", "w4a4", cfp="none", ppl={"wiki-sample": 900.0}))
    act_order["config"]["method"] |= {"act_order": True, "resume": False}  # resume: no change
    sweep.add(act_order)
    header, body = pivot(load_results(tmp_path), ["variant"], "setting", "ppl/wiki-sample")
    assert header == ["variant", "w4a4"]
    assert body == [
        ["gptq (act_order=True)", "900.00"],
        ["osplus", "169.40"],
        ["osplus [eval bf16]", "170.10"],
        ["cbq", "680.00"],
        ["cbq (cfp: weight_act (migrate))", "84.90"],
        ["cbq (window: K=1; loss: l2)", "700.00"],
        ["cbq (loss: l2_kl +hom (relative l2))", "650.00"],
    ]
    main([str(tmp_path), "--rows", "variant", "--best", "min"])
    assert "| cbq (cfp: weight_act (migrate)) | **84.90** |" in capsys.readouterr().out


def test_rounding_label_names_the_form():
    sigmoid = run(rounding=("lora", 5))
    sigmoid["config"]["rounding"]["form"] = "sigmoid"
    assert rounding_label(ResultRecord.from_json(sigmoid)) == "lora r=5, sigmoid"
    full_rank = ResultRecord.from_json(run(rounding=("adaround", 5)))
    assert rounding_label(full_rank) == "adaround (full rank)"
