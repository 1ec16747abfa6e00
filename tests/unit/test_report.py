"""The A/B report's arithmetic and rendering (benchmarks/report_model.py, render_report.py),
on hand-made results shaped like report_bench.py's; the committed results must carry every
section the report reads."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import render_report  # noqa: E402
from report_model import job_ratio, losses, lower_bound, ratios  # noqa: E402
import workloads  # noqa: E402
from workloads import WORKLOADS, by_name, fio_sections, preflight  # noqa: E402

MiB = 1 << 20


def test_lower_bound_counts_only_chunks_in_use_at_the_checkpoint_and_overwritten():
    free_at_mark = {10, 11, 12, 13}
    written = {1, 2, 10, 11}          # 1, 2 were in use: saved; 10, 11 were free: not needed
    free_at_end = {3, 4, 12, 13, 2}   # 3, 4 freed and untouched; 2 was overwritten (counted once)
    lb = lower_bound(written, free_at_mark, free_at_end, 4096)
    assert lb["chunks"] == 2 and lb["bytes"] == 2 * 4096
    assert lb["written_into_free_chunks"] == 2
    assert lb["freed_untouched_chunks"] == 2
    assert lb["overwritten_or_freed_bytes"] == 4 * 4096


def result(**over) -> dict:
    r = {
        "workload": {"name": "database", "title": "SQLite", "what": "w", "data": {}},
        "setup": {"filesystem": "ext4", "fs_bytes": 1024 * MiB, "chunk_bytes": 4096, "used_at_checkpoint": 100 * MiB,
                  "free_at_checkpoint": 900 * MiB, "date": "2026-12-01 12:00:00 UTC", "git_commit": "a" * 40},
        "machine": {"kernel": "6.1.0", "dm_targets": {"snapshot": "v1.16.0"}, "emulation": "qemu TCG", "cpus": 1,
                    "mem_total": "1 GB"},
        "none": {"write_s": 10.0, "figures": {"rows": 5}},
        "fiesnap": {
            "plain": {"write_s": 12.0, "used_bytes": 40 * MiB, "metadata_bytes": 1 * MiB, "seeded_areas": 0,
                      "exceptions_in_core": 9000},
            "free_aware": {"write_s": 11.0, "used_bytes": 22 * MiB, "metadata_bytes": 4 * MiB, "seeded_areas": 900,
                           "exceptions_in_core": 5000}},
        "bow": {"backup_bytes": 20 * MiB, "log_bytes": 1 * MiB},
        "lvm": {"write_s": 24.0, "none_write_s": 20.0, "cow_used_bytes": 41 * MiB, "metadata_bytes": MiB,
                "exceptions_in_core": 9000},
        "lower_bound": lower_bound(range(0, 6144), set(range(4096, 10240)), (), 4096),
        "merge": {"fiesnap_s": 2.0, "copy_s": 1.0, "raw_same_runs_s": 1.6, "bytes": 40 * MiB, "runs": 100,
                  "chunks": 10240, "lvconvert_s": 8.0, "instant_mount_s": 0.5, "instant_finish_s": 3.0,
                  "exact": True, "fsck_clean": True, "free_aware": {"fiesnap_s": 1.5, "bytes": 20 * MiB,
                                                                    "exact": True, "fsck_clean": True}},
    }
    r.update(over)
    r["ratios"] = ratios(r)
    return r


def test_ratios_are_each_peer_against_its_reference():
    q = result()["ratios"]
    assert q["plain"]["space_vs_bow"] == 2.0
    assert q["free_aware"]["space_vs_bow"] == 1.1
    assert q["plain"]["space_vs_lower_bound"] == 2.5      # 40 MiB against 16 MiB (4096 chunks)
    assert q["plain"]["write_vs_none"] == 1.2
    assert q["lvm_write_vs_none"] == 1.2                   # against its own volume without a snapshot
    assert q["plain"]["write_vs_lvm"] == 1.0
    assert q["merge_vs_raw"] == 1.25
    assert q["lvconvert_vs_merge"] == 4.0


def test_a_peer_that_did_not_run_gives_no_ratio_rather_than_a_number():
    q = result(lvm=None)["ratios"]
    assert q["lvm_write_vs_none"] is None and q["plain"]["write_vs_lvm"] is None
    assert q["plain"]["space_vs_lvm"] is None


def test_losses_name_the_mechanism_behind_each():
    r = result()
    text = " ".join(losses(r, r["ratios"]))
    assert "plain store needs 2.00x dm-bow's backup bytes" in text
    assert "written into blocks that were free at the checkpoint" in text   # 8 MiB of 40 written into free
    assert "free-aware store needs 1.10x" in text and "pre-written table" in text
    assert "merge takes 1.25x a raw O_DIRECT copy" in text


def test_a_slower_free_aware_store_is_explained_by_its_table():
    r = result()
    r["fiesnap"]["free_aware"].update(write_s=30.0, cow_linear_targets=905, seeded_bytes=900 * MiB)
    r["fiesnap"]["plain"]["cow_linear_targets"] = 1
    r["merge"]["free_aware"].update(fiesnap_s=3.0, copy_s=0.3, raw_same_runs_s=0.3)
    r["ratios"] = ratios(r)
    text = " ".join(losses(r, r["ratios"]))
    assert "free-aware store's writes took 2.50x the plain store's" in text
    assert "took 1.25x LVM's time with a snapshot" in text
    assert "905 linear targets, one per pre-written exception area" in text and "flush" in text
    assert "merge of the free-aware store takes 10.00x" in text and "230,400 pre-written entries" in text
    assert text.count("905 linear targets") == 2      # against LVM's snapshot and against the plain store
    assert text.count("device-mapper sends the flush") == 1   # explained once, then referred to
    assert "plain store took" not in text and "plain store slowed" not in text   # 1.2x its reference, as LVM's


def test_a_larger_overhead_on_a_faster_baseline_is_said_to_be_the_baseline():
    r = result()
    r["none"]["write_s"] = 8.0                        # the bare disk: faster than LVM's volume (20 s)
    r["ratios"] = ratios(r)
    text = " ".join(losses(r, r["ratios"]))
    assert "plain store slowed the workload more against its reference than LVM's snapshot did" in text
    assert "took 0.50x LVM's time with a snapshot" in text and "the references differ" in text


def test_no_write_loss_against_an_lvm_reference_that_was_slower_than_its_snapshot():
    r = result()
    r["none"]["write_s"] = 8.0
    r["lvm"]["none_write_s"] = 30.0                   # LVM faster with a snapshot than without: noise
    r["ratios"] = ratios(r)
    text = " ".join(losses(r, r["ratios"]))
    assert "LVM's time" not in text and "LVM's snapshot did" not in text


def test_no_loss_is_reported_within_the_noise():
    r = result()
    r["fiesnap"]["free_aware"]["used_bytes"] = 20 * MiB
    r["fiesnap"]["plain"]["used_bytes"] = 20 * MiB
    r["merge"]["raw_same_runs_s"] = 2.0
    r["ratios"] = ratios(r)
    assert losses(r, r["ratios"]) == []


def test_fio_job_ratios_use_fios_run_time_and_each_peers_own_baseline():
    jobs = lambda s: {"jobs": {"seq": {"wall_s": 9.0, "fio_runtime_s": s, "bw_bytes": MiB}}}  # noqa: E731
    r = result(none={"write_s": 10.0, "figures": jobs(2.0)})
    r["fiesnap"]["plain"]["figures"] = jobs(3.0)
    r["lvm"]["figures"], r["lvm"]["none_figures"] = jobs(8.0), jobs(4.0)
    assert job_ratio(r, "plain", "seq") == 1.5
    assert job_ratio(r, "lvm", "seq") == 2.0
    assert job_ratio(r, "free_aware", "seq") is None


def test_render_writes_a_table_per_workload_and_replaces_the_old_report(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    r = result()
    (res / "database.json").write_text(json.dumps(r))
    other = copy.deepcopy(r)
    other["workload"] = {"name": "logs", "title": "Logs", "what": "w", "data": {}}
    (res / "logs.json").write_text(json.dumps(other))
    (tmp_path / "REPORT.md").write_text("old")
    body = render_report.render(res, tmp_path, with_plots=False)
    assert (tmp_path / "REPORT.md").read_text() == body
    assert body.index("## SQLite") < body.index("## Logs")       # the workloads' order, not the files'
    assert "| SQLite | 16.0 | 20.0 | 40.0 | 22.0 | 41.0 | 2.00x | 1.10x |" in body
    assert "byte-exact" in body and "Where fiesnap loses:" in body
    assert "Not in this run:" in body                           # five workloads missing here


def test_every_table_row_has_as_many_cells_as_its_header(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    (res / "database.json").write_text(json.dumps(result()))
    text = render_report.render(res, tmp_path, with_plots=False)
    table: list[str] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            widths = {row.count("|") for row in table}
            assert len(widths) == 1, table[:2]
        table = []


def test_render_refuses_an_empty_results_folder(tmp_path):
    with pytest.raises(SystemExit, match="make report"):
        render_report.render(tmp_path, tmp_path, with_plots=False)


def test_workload_names_are_checked():
    assert [w.name for w in by_name("logs,fio")] == ["logs", "fio"]
    with pytest.raises(SystemExit, match="unknown workload"):
        by_name("logs,nope")
    assert len(WORKLOADS) == 7


def _lab_kernel(lab, requested, package, version, deb=True):
    cache = lab / "kernels" / requested
    (cache / "root" / "lib" / "modules" / version / "kernel" / "fs").mkdir(parents=True)
    (cache / "kernel.json").write_text(json.dumps({"requested": requested, "package": package, "version": version}))
    if deb:
        (cache / "debs").mkdir()
        (cache / "debs" / f"{package}_1_amd64.deb").write_bytes(b"!<arch>\n")


def test_the_download_is_the_newer_kernels_own_package(tmp_path, monkeypatch):
    monkeypatch.setattr(workloads, "REPO", str(tmp_path))
    _lab_kernel(tmp_path / ".lab", "linux-image-6.12-amd64", "linux-image-6.12.117+deb12-amd64", "6.12.117+deb12-amd64")
    _lab_kernel(tmp_path / ".lab", "linux-image-amd64", "linux-image-6.1.0-57-amd64", "6.1.0-57-amd64")
    old, new = workloads.kernel_trees()
    assert (old.version, new.version) == ("6.1.0-57-amd64", "6.12.117+deb12-amd64")
    assert workloads._newest_deb().name == "linux-image-6.12.117+deb12-amd64_1_amd64.deb"


def test_a_missing_prerequisite_stops_the_run_before_any_workload(tmp_path, monkeypatch):
    monkeypatch.setattr(workloads, "REPO", str(tmp_path))
    _lab_kernel(tmp_path / ".lab", "linux-image-6.12-amd64", "linux-image-6.12.117+deb12-amd64", "6.12.117+deb12-amd64",
                deb=False)
    _lab_kernel(tmp_path / ".lab", "linux-image-amd64", "linux-image-6.1.0-57-amd64", "6.1.0-57-amd64")
    preflight(by_name("package_upgrade,database,logs,rewrite_in_place"))
    with pytest.raises(SystemExit, match="make lab"):
        preflight(by_name("database,new_files"))
    with pytest.raises(SystemExit, match="git history"):
        preflight(by_name("source_tree"))


def test_the_fio_job_file_has_the_four_kinds_over_old_data_and_into_free_space():
    names = fio_sections()
    for kind in ("seq-1m-direct", "seq-1m-buffered", "rand-4k-direct", "rand-4k-buffered"):
        assert f"{kind}-over" in names and f"{kind}-free" in names


COMMITTED = sorted((BENCH / "results").glob("*.json"))


@pytest.mark.skipif(not COMMITTED, reason="no committed results yet")
@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_committed_results_name_every_peer_and_their_provenance(path):
    r = json.loads(path.read_text())
    for key in ("fiesnap", "bow", "lvm", "lower_bound", "merge", "none", "ratios"):
        assert r.get(key) is not None, key
    assert {"plain", "free_aware"} <= set(r["fiesnap"])
    for key in ("kernel", "dm_targets"):
        assert r["machine"][key]
    for key in ("filesystem", "fs_bytes", "chunk_bytes", "date", "git_commit"):
        assert r["setup"][key]
    assert r["merge"]["exact"] and r["merge"]["fsck_clean"]
    assert (BENCH / "REPORT.md").exists() and r["workload"]["title"] in (BENCH / "REPORT.md").read_text()


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_the_download_workload_unpacks_into_a_folder_it_makes(tmp_path, monkeypatch):
    lab = tmp_path / "repo" / ".lab"
    monkeypatch.setattr(workloads, "REPO", str(tmp_path / "repo"))
    _lab_kernel(lab, "linux-image-amd64", "linux-image-6.1.0-57-amd64", "6.1.0-57-amd64")
    _lab_kernel(lab, "linux-image-6.12-amd64", "linux-image-6.12.117+deb12-amd64", "6.12.117+deb12-amd64", deb=False)
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text("Package: tiny\nVersion: 1\nArchitecture: all\n"
                                           "Maintainer: nobody <nobody@example.org>\nDescription: a test package\n")
    (pkg / "boot").mkdir()
    (pkg / "boot" / "vmlinuz-test").write_bytes(b"k" * 5000)
    debs = lab / "kernels" / "linux-image-6.12-amd64" / "debs"
    debs.mkdir()
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(pkg),
                    str(debs / "linux-image-6.12.117+deb12-amd64_1_amd64.deb")], check=True, capture_output=True)
    root = tmp_path / "fs"
    root.mkdir()
    figures = workloads.run_new_files(str(root))
    assert (root / "opt" / "unpacked" / "boot" / "vmlinuz-test").read_bytes() == b"k" * 5000
    assert figures["unpacked_bytes"] == 5000
