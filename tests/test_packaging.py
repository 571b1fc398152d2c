"""packaging/build_plugin.py and the plugin's vendor loader, without Krita and without the network.

Wheels here are small fake zips named like the real ones, in a temporary cache, so the choice of
wheel per platform (abi3, universal2, manylinux aliases), the unpacking and the lock are tested
offline. The real wheels are exercised by test_krita_harness.py's vendored test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import platform
import sys
import zipfile
from pathlib import Path

import krita_harness
import pytest

ROOT = Path(__file__).resolve().parent.parent
bp = krita_harness.load_build_plugin()


def _load_vendor():
    spec = importlib.util.spec_from_file_location(
        "krita_sdxl_refiner_vendor_under_test", ROOT / "krita_plugin" / "krita_sdxl_refiner" / "vendor.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vendor = _load_vendor()

DESKTOP = """[Desktop Entry]
Type=Service
ServiceTypes=Krita/PythonPlugin
X-KDE-Library=krita_sdxl_refiner
X-Python-2-Compatible=false
Name=SDXL Refiner
Comment=test
"""


def make_plugin(root: Path) -> Path:
    package = root / "krita_sdxl_refiner"
    (package / "__pycache__").mkdir(parents=True)
    (package / "__init__.py").write_text('"""plugin"""\n')
    (package / "plugin.py").write_text("X = 1\n")
    (package / "__pycache__" / "plugin.cpython-311.pyc").write_bytes(b"junk")
    (package / ".DS_Store").write_bytes(b"junk")
    (package / "_vendor" / "stale").mkdir(parents=True)  # a leftover must not be packaged
    (package / "_vendor" / "stale" / "x.py").write_text("")
    (root / "krita_sdxl_refiner.desktop").write_text(DESKTOP)
    return root


def make_protocol(root: Path) -> Path:
    (root / "__pycache__").mkdir(parents=True)
    (root / "__init__.py").write_text('"""protocol"""\n')
    (root / "codec.py").write_text("import msgpack\n")
    (root / "__pycache__" / "codec.cpython-311.pyc").write_bytes(b"junk")
    return root


def fake_wheel(cache: Path, filename: str, files: dict[str, bytes]) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / filename
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


# The wheel set PyPI really offers for pyzmq 27.3.0 and msgpack 1.2.4 (names only), and content
# that says which wheel it came from.
REAL_NAMES = [
    "pyzmq-27.3.0-cp311-cp311-win_amd64.whl",
    "pyzmq-27.3.0-cp312-abi3-win_amd64.whl",
    "pyzmq-27.3.0-cp311-cp311-macosx_10_15_universal2.whl",
    "pyzmq-27.3.0-cp312-abi3-macosx_10_15_universal2.whl",
    "pyzmq-27.3.0-cp311-cp311-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
    "pyzmq-27.3.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
    "pyzmq-27.3.0-cp312-abi3-manylinux_2_31_x86_64.whl",  # needs a newer glibc: never chosen
    "msgpack-1.2.4-cp311-cp311-win_amd64.whl",
    "msgpack-1.2.4-cp312-cp312-win_amd64.whl",
    "msgpack-1.2.4-cp311-cp311-macosx_10_9_x86_64.whl",
    "msgpack-1.2.4-cp311-cp311-macosx_11_0_arm64.whl",
    "msgpack-1.2.4-cp312-cp312-macosx_10_13_x86_64.whl",
    "msgpack-1.2.4-cp312-cp312-macosx_11_0_arm64.whl",
    "msgpack-1.2.4-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    "msgpack-1.2.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
    "msgpack-1.2.3-cp311-cp311-win_amd64.whl",  # another version: ignored
]


def fill_cache(cache: Path) -> None:
    for name in REAL_NAMES:
        top = "zmq" if name.startswith("pyzmq") else "msgpack"
        dist = name.split("-")[0] + "-" + name.split("-")[1] + ".dist-info"
        fake_wheel(
            cache,
            name,
            {
                f"{top}/__init__.py": f"WHEEL = {name!r}\n".encode(),
                f"{top}/__pycache__/x.cpython-311.pyc": b"junk",
                f"{dist}/METADATA": b"Name: x\n",
                f"{top.replace('zmq', 'pyzmq')}-x.data/purelib/{top}/extra.py": b"EXTRA = 1\n",
                f"{top.replace('zmq', 'pyzmq')}-x.data/headers/zmq.h": b"/* not importable */\n",
            },
        )


def lock_for(cache: Path) -> Path:
    lock = cache.parent / "lock.sha256"
    bp.write_lock(lock, {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in cache.glob("*.whl")})
    return lock


# ----------------------------------------------------------------------------- wheel choice


@pytest.mark.parametrize(
    ("tag", "pyzmq", "msgpack"),
    [
        ("cp311-win_amd64", "pyzmq-27.3.0-cp311-cp311-win_amd64.whl", "msgpack-1.2.4-cp311-cp311-win_amd64.whl"),
        ("cp312-win_amd64", "pyzmq-27.3.0-cp312-abi3-win_amd64.whl", "msgpack-1.2.4-cp312-cp312-win_amd64.whl"),
        (
            "cp311-macosx_x86_64",
            "pyzmq-27.3.0-cp311-cp311-macosx_10_15_universal2.whl",
            "msgpack-1.2.4-cp311-cp311-macosx_10_9_x86_64.whl",
        ),
        (
            "cp311-macosx_arm64",
            "pyzmq-27.3.0-cp311-cp311-macosx_10_15_universal2.whl",
            "msgpack-1.2.4-cp311-cp311-macosx_11_0_arm64.whl",
        ),
        (
            "cp312-macosx_arm64",
            "pyzmq-27.3.0-cp312-abi3-macosx_10_15_universal2.whl",
            "msgpack-1.2.4-cp312-cp312-macosx_11_0_arm64.whl",
        ),
        (
            "cp312-manylinux_x86_64",
            "pyzmq-27.3.0-cp312-abi3-manylinux_2_26_x86_64.manylinux_2_28_x86_64.whl",
            "msgpack-1.2.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl",
        ),
    ],
)
def test_the_right_wheel_is_chosen_for_each_interpreter(tmp_path: Path, tag: str, pyzmq: str, msgpack: str) -> None:
    fill_cache(tmp_path)
    (target,) = bp.select_targets([tag])
    assert bp.find_cached_wheel(tmp_path, "pyzmq", "27.3.0", target).name == pyzmq
    assert bp.find_cached_wheel(tmp_path, "msgpack", "1.2.4", target).name == msgpack


def test_no_wheel_for_an_interpreter_the_abi3_floor_excludes(tmp_path: Path) -> None:
    fake_wheel(tmp_path, "pyzmq-27.3.0-cp312-abi3-win_amd64.whl", {"zmq/__init__.py": b""})
    (cp311,) = bp.select_targets(["cp311-win_amd64"])
    (cp312,) = bp.select_targets(["cp312-win_amd64"])
    assert bp.find_cached_wheel(tmp_path, "pyzmq", "27.3.0", cp311) is None
    assert bp.find_cached_wheel(tmp_path, "pyzmq", "27.3.0", cp312) is not None


def test_platform_patterns() -> None:
    assert len(bp.select_targets(None)) == 12
    assert [t.tag for t in bp.select_targets(["*-manylinux_x86_64"])] == [
        "cp310-manylinux_x86_64",
        "cp311-manylinux_x86_64",
        "cp312-manylinux_x86_64",
    ]
    with pytest.raises(bp.BuildError, match="no platform matches cp39"):
        bp.select_targets(["cp39-win_amd64"])


# ----------------------------------------------------------------------------- the zip


def build(tmp_path: Path, output: str = "out.zip", **kwargs) -> Path:
    plugin = make_plugin(tmp_path / "plugin") if not (tmp_path / "plugin").exists() else tmp_path / "plugin"
    protocol = tmp_path / "protocol"
    if not protocol.exists():
        make_protocol(protocol)
    return bp.build(tmp_path / output, plugin_dir=plugin, protocol_dir=protocol, **kwargs)


def test_no_vendor_zip_layout_is_what_krita_imports(tmp_path: Path) -> None:
    zip_path = build(tmp_path, vendor=False)
    names = zipfile.ZipFile(zip_path).namelist()
    assert names == sorted(names)
    assert "krita_sdxl_refiner.desktop" in names
    # Krita's importer needs the directory entry and the __init__.py inside it.
    assert "krita_sdxl_refiner/" in names and "krita_sdxl_refiner/__init__.py" in names
    assert "krita_sdxl_refiner/plugin.py" in names
    assert "krita_sdxl_refiner/_vendor/common/krita_sdxl/__init__.py" in names
    assert "krita_sdxl_refiner/_vendor/common/krita_sdxl/protocol/codec.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".DS_Store")) or "stale" in n]
    assert not [n for n in names if n.startswith("krita_sdxl_refiner/_vendor/cp")]
    for info in zipfile.ZipFile(zip_path).infolist():
        assert info.date_time == (1980, 1, 1, 0, 0, 0)

    installed = krita_harness.install_plugin_zip(zip_path, tmp_path / "resources")
    assert installed == ["krita_sdxl_refiner"]
    pykrita = tmp_path / "resources" / "pykrita"
    assert (pykrita / "krita_sdxl_refiner.desktop").read_text() == DESKTOP
    assert (pykrita / "krita_sdxl_refiner" / "_vendor" / "common" / "krita_sdxl" / "protocol" / "codec.py").is_file()


def test_vendored_zip_holds_each_interpreter_folder_and_is_deterministic(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fill_cache(cache)
    lock = lock_for(cache)
    args = {"vendor": True, "wheels_cache": cache, "lock_file": lock, "offline": True}
    platforms = ["cp311-*", "cp312-win_amd64"]
    first = build(tmp_path, "a.zip", platforms=platforms, **args)
    second = build(tmp_path, "b.zip", platforms=platforms, **args)
    assert first.read_bytes() == second.read_bytes()

    zf = zipfile.ZipFile(first)
    vendored = {n.split("/")[2] for n in zf.namelist() if n.startswith("krita_sdxl_refiner/_vendor/cp")}
    assert vendored == {
        "cp311-win_amd64",
        "cp311-macosx_x86_64",
        "cp311-macosx_arm64",
        "cp311-manylinux_x86_64",
        "cp312-win_amd64",
    }
    prefix = "krita_sdxl_refiner/_vendor/cp311-macosx_arm64/"
    assert zf.read(prefix + "msgpack/__init__.py") == b"WHEEL = 'msgpack-1.2.4-cp311-cp311-macosx_11_0_arm64.whl'\n"
    assert b"universal2" in zf.read(prefix + "zmq/__init__.py")
    assert zf.read(prefix + "zmq/extra.py") == b"EXTRA = 1\n"  # .data/purelib goes to the top
    assert prefix + "pyzmq-27.3.0.dist-info/METADATA" in zf.namelist()  # licences stay
    assert not [n for n in zf.namelist() if n.endswith("zmq.h") or "__pycache__" in n or ".data/" in n]


def test_wheels_must_match_the_lock(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fill_cache(cache)
    lock = lock_for(cache)
    tampered = cache / "msgpack-1.2.4-cp311-cp311-win_amd64.whl"
    tampered.write_bytes(tampered.read_bytes() + b"\0")
    with pytest.raises(bp.BuildError, match="sha256"):
        build(tmp_path, platforms=["cp311-win_amd64"], wheels_cache=cache, lock_file=lock, offline=True)
    empty_lock = tmp_path / "empty.sha256"
    with pytest.raises(bp.BuildError, match="not in the wheel lock"):
        build(tmp_path, platforms=["cp312-win_amd64"], wheels_cache=cache, lock_file=empty_lock, offline=True)
    build(tmp_path, platforms=["cp312-win_amd64"], wheels_cache=cache, lock_file=empty_lock, update_lock=True)
    assert "msgpack-1.2.4-cp312-cp312-win_amd64.whl" in bp.read_lock(empty_lock)


def test_offline_build_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(bp.BuildError, match=r"--offline: no cached wheel for pyzmq, msgpack on cp310-win_amd64"):
        build(tmp_path, platforms=["cp310-win_amd64"], wheels_cache=tmp_path / "empty", offline=True)


def test_a_desktop_file_krita_would_not_import_is_refused(tmp_path: Path) -> None:
    plugin = make_plugin(tmp_path / "plugin")
    (plugin / "krita_sdxl_refiner.desktop").write_text(DESKTOP.replace("X-KDE-Library=krita_sdxl_refiner", "X=1"))
    with pytest.raises(bp.BuildError, match="X-KDE-Library"):
        build(tmp_path, vendor=False)


def test_the_committed_lock_covers_every_platform() -> None:
    lock = bp.read_lock(bp.DEFAULT_LOCK)
    for target in bp.ALL_TARGETS:
        for project, version in bp.PACKAGES.items():
            usable = [
                name
                for name in lock
                if (w := bp.WheelName.parse(Path(name))) is not None
                and w.project == project
                and w.version == version
                and w.rank(target) is not None
            ]
            assert usable, f"no locked {project} {version} wheel for {target.tag}"


def test_cli_writes_the_zip_and_reports_its_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_plugin(tmp_path / "plugin")
    make_protocol(tmp_path / "protocol")
    out = tmp_path / "dist" / "p.zip"
    argv = ["-o", str(out), "--no-vendor", "--plugin-dir", str(tmp_path / "plugin")]
    assert bp.main([*argv, "--protocol-dir", str(tmp_path / "protocol")]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and out.is_file()
    assert bp.main(["-o", str(out), "--no-vendor", "--plugin-dir", str(tmp_path / "nothing")]) == 1
    assert "no plugin package" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the backend wheel and setup.plan


def test_the_zip_carries_the_backend_wheel_of_its_own_version_and_the_setup_code(tmp_path: Path) -> None:
    import subprocess

    from krita_sdxl.backend.setup.plan import VERSION

    zip_path = build(tmp_path, vendor=False)
    names = zipfile.ZipFile(zip_path).namelist()
    wheel_entry = f"krita_sdxl_refiner/_wheels/krita_sdxl-{VERSION}-py3-none-any.whl"
    assert wheel_entry in names
    beside = tmp_path / f"krita_sdxl-{VERSION}-py3-none-any.whl"  # also beside the zip, for pip on a server
    assert beside.read_bytes() == zipfile.ZipFile(zip_path).read(wheel_entry)
    wheel = zipfile.ZipFile(beside)
    metadata = wheel.read(f"krita_sdxl-{VERSION}.dist-info/METADATA").decode()
    assert f"Version: {VERSION}" in metadata and "Requires-Dist: torch" in metadata
    assert (
        "krita_sdxl/backend/setup/plan/steps.py" in wheel.namelist()
        and "krita_sdxl/backend/cli/main.py" in wheel.namelist()
    )
    assert not [n for n in wheel.namelist() if "__pycache__" in n]
    common = "krita_sdxl_refiner/_vendor/common/krita_sdxl/backend"
    assert f"{common}/__init__.py" in names and f"{common}/setup/plan/torch_builds.py" in names
    shared = (
        f"{common}/setup/plan",
        f"{common}/__init__.py",
        f"{common}/",
        f"{common}/setup/",
        f"{common}/setup/__init__.py",
    )
    assert not [
        n for n in names if n.startswith(f"{common}/") and not n.startswith(shared[:2]) and n not in shared
    ]  # not the service
    # In Krita the vendored copy imports with the standard library alone (no torch, numpy, zmq).
    zipfile.ZipFile(zip_path).extractall(tmp_path / "x")
    check = (
        "import sys; import krita_sdxl.backend.setup.plan as p; from krita_sdxl.backend.setup.plan import steps, "
        "pythons, torch_builds, hub, failures, events, procenv, space, machine; "
        "heavy = {'torch', 'numpy', 'zmq', 'msgpack', 'diffusers', 'huggingface_hub'} & set(sys.modules); "
        "print(p.__file__, p.VERSION, sorted(heavy))"
    )
    env = {"PYTHONPATH": str(tmp_path / "x" / "krita_sdxl_refiner" / "_vendor" / "common")}
    out = subprocess.run([sys.executable, "-S", "-c", check], env=env, capture_output=True, text=True, check=True)
    path, version, heavy = out.stdout.split(" ", 2)
    assert "_vendor/common/krita_sdxl/backend/setup/plan" in path and version == VERSION and heavy.strip() == "[]"


def test_a_wheel_of_another_version_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((ROOT / name).read_bytes())
    import shutil

    for package in ("backend", "protocol"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    assert bp.source_version(source) == bp.source_version(ROOT)
    (source / "backend" / "setup" / "plan" / "version.py").write_text("VERSION = 1\n")
    with pytest.raises(bp.BuildError, match="has no VERSION"):
        bp.build_backend_wheel(source, tmp_path / "out")


# ----------------------------------------------------------------------------- vendor.py


@pytest.mark.parametrize(
    ("args", "tag"),
    [
        (((3, 10, 11), "win32", "AMD64", "cpython", 64), "cp310-win_amd64"),
        (((3, 11, 2), "linux", "x86_64", "cpython", 64), "cp311-manylinux_x86_64"),
        (((3, 12, 0), "darwin", "arm64", "cpython", 64), "cp312-macosx_arm64"),
        (((3, 11, 9), "darwin", "x86_64", "cpython", 64), "cp311-macosx_x86_64"),
        (((3, 11, 9), "linux", "aarch64", "cpython", 64), "cp311-manylinux_aarch64"),
        (((3, 10, 0), "win32", "AMD64", "cpython", 32), None),
        (((3, 10, 0), "win32", "ARM64", "cpython", 64), None),
        (((3, 10, 0), "linux", "x86_64", "pypy", 64), None),
        (((3, 10, 0), "freebsd13", "amd64", "cpython", 64), None),
    ],
)
def test_interpreter_tag(args: tuple, tag: str | None) -> None:
    assert vendor.interpreter_tag(*args) == tag


def test_every_built_folder_is_a_tag_the_loader_can_compute() -> None:
    machines = {"win_amd64": ("win32", "AMD64"), "manylinux_x86_64": ("linux", "x86_64")}
    machines |= {"macosx_x86_64": ("darwin", "x86_64"), "macosx_arm64": ("darwin", "arm64")}
    for target in bp.ALL_TARGETS:
        version = tuple(int(x) for x in target.python.split("."))
        assert vendor.interpreter_tag(version, *machines[target.platform], "cpython", 64) == target.tag


@pytest.fixture
def clean_imports():
    path, modules = list(sys.path), dict(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - set(modules):
        del sys.modules[name]
    sys.modules.update(modules)


def test_activate_puts_common_then_the_interpreter_folder_first(
    tmp_path: Path, clean_imports: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = vendor.interpreter_tag()
    assert tag is not None
    for folder, module in (("common", "vendortest_common"), (tag, "vendortest_binary")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{module}.py").write_text(f"WHERE = {folder!r}\n")
    monkeypatch.setattr(vendor, "REQUIRED_MODULES", ("vendortest_common", "vendortest_binary"))
    vendor.activate(tmp_path)
    vendor.activate(tmp_path)  # idempotent
    assert sys.path[:2] == [str(tmp_path / "common"), str(tmp_path / tag)]
    assert sys.modules["vendortest_binary"].WHERE == tag


def test_activate_without_bundles_uses_what_python_has(tmp_path: Path, clean_imports: None) -> None:
    pytest.importorskip("zmq")
    pytest.importorskip("msgpack")
    (tmp_path / "common").mkdir()
    vendor.activate(tmp_path)  # no folder for this interpreter, but zmq and msgpack import
    assert sys.path[0] == str(tmp_path / "common")


def test_activate_explains_what_is_missing(
    tmp_path: Path, clean_imports: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cp399-win_amd64").mkdir(parents=True)
    monkeypatch.setattr(vendor, "REQUIRED_MODULES", ("zmq", "vendortest_surely_missing"))
    with pytest.raises(vendor.VendorError) as info:
        vendor.activate(tmp_path)
    message = str(info.value)
    assert sys.platform in message and platform.machine() in message
    assert f"Python {sys.version_info[0]}.{sys.version_info[1]}." in message
    assert "cp399-win_amd64" in message and "vendortest_surely_missing" in message
    assert vendor.interpreter_tag() in message


def test_broken_bundled_binaries_are_reported(
    tmp_path: Path, clean_imports: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = vendor.interpreter_tag()
    (tmp_path / tag).mkdir(parents=True)
    (tmp_path / tag / "vendortest_broken.py").write_text("raise OSError('undefined symbol: zmq_foo')\n")
    monkeypatch.setattr(vendor, "REQUIRED_MODULES", ("vendortest_broken",))
    with pytest.raises(vendor.VendorError, match=f"bundled pyzmq/msgpack \\({tag}\\) failed to load.*zmq_foo"):
        vendor.activate(tmp_path)
