"""`gprl demo`, the README's main job, on a short budget: both variants train in the synthetic world (built once
into the usual cache), and the table names every evaluation."""

import pytest


@pytest.mark.slow
def test_demo_trains_both_variants_and_writes_the_table(tmp_path):
    from gprl.demo import demo

    text = demo(str(tmp_path / "demo"), steps=6, log=lambda *_: None)
    header, _, *rows = text.splitlines()
    assert [c.strip() for c in header.split("|")[4:7]] == ["oracle win @ 2", "oracle win @ 4", "oracle win @ 6"]
    assert [r.split("|")[1].strip() for r in rows] == ["gprl", "grpo_bt_monitor"]
    assert [r.split("|")[2].strip() for r in rows] == ["on", "on (k = 1: never acts)"]
    for r in rows:
        wins = [float(c) for c in r.split("|")[4:7]]
        assert all(0.0 <= w <= 1.0 for w in wins)
    assert (tmp_path / "demo" / "demo.md").read_text().count("| gprl |") == 1
    for variant in ("gprl", "grpo_bt_monitor"):
        assert (tmp_path / "demo" / variant / "seed0" / "report" / "summary.md").exists()


def test_a_variant_can_run_on_another_world_gpm(tmp_path):
    from gprl.demo import variant_spec

    assert variant_spec("gprl", {}, tmp_path, 1, "world:gpm_aspects").gpm.path == "world:gpm_aspects"
    assert variant_spec("gprl", {}, tmp_path, 1).gpm.path == "world:gpm"
    assert variant_spec("grpo_bt", {}, tmp_path, 1, "world:gpm_aspects").gpm.path == "world:bt"  # BT rows keep BT
