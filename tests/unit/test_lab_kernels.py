"""The lab's kernel cache: one folder per Debian kernel package, names checked, runs reported.

The lab boots whichever Debian kernel package it is given; these host tests cover the
parts that need no download (name checks, the cache layout, apt's answer for a meta
package against a versioned one, the per-run kernel line).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.lab import __main__ as lab_cli
from tests.lab.kernel import (
    META_PACKAGE,
    SECOND_PACKAGE,
    KernelError,
    KernelImage,
    check_package_name,
    ensure_kernel,
    requested_package,
    resolve_package,
)


def _fake_cache(lab_dir, requested, version, package):
    """What a finished unpack leaves: the stamp, a vmlinuz and modules.dep."""
    cache = lab_dir / "kernels" / requested
    root = cache / "root"
    (root / "boot").mkdir(parents=True)
    (root / "boot" / f"vmlinuz-{version}").write_bytes(b"kernel")
    mods = root / "lib" / "modules" / version
    mods.mkdir(parents=True)
    (mods / "modules.dep").write_text("")
    (cache / "kernel.json").write_text(json.dumps(
        {"requested": requested, "package": package, "version": version, "deb": f"{package}_1_amd64.deb"}))
    return cache


@pytest.mark.parametrize("name", [META_PACKAGE, SECOND_PACKAGE, "linux-image-6.1.0-57-amd64",
                                  "linux-image-6.12.117+deb12-amd64", "linux-image-6.12.117+deb12-cloud-amd64"])
def test_kernel_package_names_are_accepted(name):
    assert check_package_name(name) == name


@pytest.mark.parametrize("name", ["", "linux-image-", "../kernel", "linux-image-6.1/../../x", "linux-image-6.1 -o x",
                                  "-olinux-image-amd64", "linux-headers-amd64", "linux-image-..-amd64"])
def test_other_names_are_refused_before_apt_or_the_cache_sees_them(name):
    with pytest.raises(KernelError, match="not a kernel image package name"):
        check_package_name(name)


def test_the_requested_package_comes_from_the_argument_then_the_environment(monkeypatch):
    monkeypatch.delenv("FIESNAP_LAB_KERNEL", raising=False)
    assert requested_package() == META_PACKAGE
    monkeypatch.setenv("FIESNAP_LAB_KERNEL", SECOND_PACKAGE)
    assert requested_package() == SECOND_PACKAGE
    assert requested_package("linux-image-6.1.0-57-amd64") == "linux-image-6.1.0-57-amd64"
    monkeypatch.setenv("FIESNAP_LAB_KERNEL", "bad name")
    with pytest.raises(KernelError):
        requested_package()


def test_each_package_has_its_own_cache_and_a_cached_one_needs_no_apt(tmp_path, monkeypatch):
    monkeypatch.delenv("FIESNAP_LAB_KERNEL", raising=False)
    monkeypatch.setattr("tests.lab.kernel._need_tools", lambda: pytest.fail("a cached kernel called apt"))
    _fake_cache(tmp_path, META_PACKAGE, "6.1.0-57-amd64", "linux-image-6.1.0-57-amd64")
    _fake_cache(tmp_path, SECOND_PACKAGE, "6.12.117+deb12-amd64", "linux-image-6.12.117+deb12-amd64")
    first = ensure_kernel(tmp_path)
    second = ensure_kernel(tmp_path, SECOND_PACKAGE)
    assert (first.version, first.requested, first.series) == ("6.1.0-57-amd64", META_PACKAGE, "6.1")
    assert (second.version, second.requested, second.series) == ("6.12.117+deb12-amd64", SECOND_PACKAGE, "6.12")
    assert first.vmlinuz.parent.parent.parent.name == META_PACKAGE
    assert second.vmlinuz.is_file() and second.modules_dir.is_dir()
    assert lab_cli._kernel_tag(first) == "" and lab_cli._kernel_tag(second) == "-6.12"


def test_a_cache_missing_its_modules_is_not_used(tmp_path, monkeypatch):
    cache = _fake_cache(tmp_path, SECOND_PACKAGE, "6.12.117+deb12-amd64", "linux-image-6.12.117+deb12-amd64")
    shutil.rmtree(cache / "root" / "lib")

    class Asked(Exception):
        pass

    def no_tools():
        raise Asked

    monkeypatch.setattr("tests.lab.kernel._need_tools", no_tools)
    with pytest.raises(Asked):  # it goes to apt for a fresh copy instead of booting a broken one
        ensure_kernel(tmp_path, SECOND_PACKAGE)


apt = pytest.mark.skipif(
    shutil.which("apt-cache") is None
    or subprocess.run(["apt-cache", "depends", SECOND_PACKAGE], capture_output=True).returncode != 0,
    reason="needs apt with Debian 12's package lists (the lab's own host)")


@apt
def test_a_meta_package_resolves_to_the_versioned_image_it_depends_on():
    pkg = resolve_package(SECOND_PACKAGE, allow_update=False)
    assert pkg.startswith("linux-image-6.12.") and pkg != SECOND_PACKAGE
    assert resolve_package(pkg, allow_update=False) == pkg  # a versioned image is itself


@apt
def test_an_unknown_package_says_how_to_list_the_kernels():
    with pytest.raises(KernelError, match="apt-cache search"):
        resolve_package("linux-image-0.0-nosuch-amd64", allow_update=False)


def test_the_kernel_line_names_the_release_and_the_dm_targets(tmp_path, capsys):
    (tmp_path / "kernel.txt").write_text("6.12.117+deb12-amd64\nsnapshot-merge   v1.5.0\nsnapshot  v1.16.0\n"
                                         "linear           v1.4.0\n")
    lab_cli._report_kernel(tmp_path, "guest 1/2")
    err = capsys.readouterr().err
    assert err == ("lab: guest 1/2: kernel 6.12.117+deb12-amd64; dm targets: snapshot-merge v1.5.0, "
                   "snapshot v1.16.0, linear v1.4.0\n")
    lab_cli._report_kernel(tmp_path / "missing")  # a guest that never got that far: nothing to say
    assert capsys.readouterr().err == ""


def test_kernel_image_series_of_unusual_versions():
    assert KernelImage(None, None, "6.1.0-57-amd64").series == "6.1"
    assert KernelImage(None, None, "weird").series == "weird"
