"""The setup's pure decisions (``backend/setup/plan``), for Windows, macOS and Linux alike: which Python,
which PyTorch build from which index, which model files, enough disk, which steps run, what a failure
means, and how a process starts. No Qt, no network, no torch."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from krita_sdxl.backend.setup.plan import VERSION, events, failures, hub, machine, mismatch, procenv, pythons, steps
from krita_sdxl.backend.setup.plan import torch_builds as tb
from krita_sdxl.backend.setup.plan.hub import RemoteFile
from krita_sdxl.backend.setup.plan.machine import Machine
from krita_sdxl.backend.setup.plan.space import Need, check_space, human

# --- Python discovery ---------------------------------------------------------------------------

WIN_ENV = {"LOCALAPPDATA": r"C:\Users\ann\AppData\Local", "ProgramFiles": r"C:\Program Files"}


def test_windows_prefers_the_launcher_then_python_org_installs_and_skips_the_store() -> None:
    files = {
        r"C:\Users\ann\AppData\Local\Programs\Python\Python312\python.exe",
        r"C:\Program Files\Python311\python.exe",
    }
    path = {"py": r"C:\Windows\py.exe", "python.exe": r"C:\Users\ann\AppData\Local\Microsoft\WindowsApps\python.exe"}
    found = pythons.candidates("Windows", WIN_ENV, path.get, files.__contains__)
    argvs = [c.argv for c in found]
    assert argvs[0] == (r"C:\Windows\py.exe", "-3.12")  # the launcher, most wanted version first
    assert (r"C:\Windows\py.exe", "-3.10") in argvs
    assert (r"C:\Users\ann\AppData\Local\Programs\Python\Python312\python.exe",) in argvs
    assert (r"C:\Program Files\Python311\python.exe",) in argvs
    assert not [a for a in argvs if "WindowsApps" in a[0]]  # the Store stub would open the Store


def test_macos_looks_where_python_org_and_homebrew_install_and_never_runs_usr_bin_python3() -> None:
    files = {"/Library/Frameworks/Python.framework/Versions/3.12/bin/python3.12", "/opt/homebrew/bin/python3.11"}
    path = {"python3": "/usr/bin/python3"}  # Krita started from Finder: a bare PATH
    found = pythons.candidates("Darwin", {}, path.get, files.__contains__, home="/Users/ann")
    assert [c.argv for c in found] == [
        ("/Library/Frameworks/Python.framework/Versions/3.12/bin/python3.12",),
        ("/opt/homebrew/bin/python3.11",),
    ]


def test_linux_takes_versioned_pythons_from_path_first() -> None:
    path = {"python3.11": "/usr/bin/python3.11", "python3": "/usr/bin/python3"}
    found = pythons.candidates("Linux", {}, path.get, {"/usr/bin/python3.11"}.__contains__)
    assert [c.argv for c in found] == [("/usr/bin/python3.11",), ("/usr/bin/python3",)]


def probe_line(version=(3, 12, 1), impl="cpython", bits=64, venv=True, ensurepip=True, exe="/usr/bin/python3") -> str:
    data = {"version": list(version), "implementation": impl, "bits": bits, "executable": exe, "machine": "x86_64",
            "venv": venv, "ensurepip": ensurepip}  # fmt: skip
    return json.dumps(data)


def test_the_probe_runs_and_is_read_back() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", pythons.PROBE], capture_output=True, text=True, check=True).stdout
    info = pythons.parse_probe("some warning\n" + out)
    assert info is not None and info.version[:2] == sys.version_info[:2] and info.bits == 64
    assert info.executable == sys.executable and info.has_venv
    assert pythons.parse_probe("Python was not found; run without arguments to install from the Store") is None


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (probe_line((3, 9, 6)), "too old"),
        (probe_line((3, 15, 0)), "newer than PyTorch supports"),
        (probe_line(bits=32), "32-bit"),
        (probe_line(impl="pypy"), "CPython"),
        (probe_line(ensurepip=False), "install python3.12-venv"),
    ],
)
def test_unusable_pythons_say_why(line: str, why: str) -> None:
    info = pythons.parse_probe(line)
    assert info is not None
    assert why in (pythons.problem(info, "Linux") or "")
    assert pythons.choose([info], "Linux") is None


def test_choose_prefers_3_12_and_the_newest_patch() -> None:
    infos = [pythons.parse_probe(probe_line(v, exe=f"/p{v[1]}.{v[2]}")) for v in [(3, 10, 9), (3, 12, 1), (3, 12, 7)]]
    chosen = pythons.choose([i for i in infos if i], "Linux")
    assert chosen is not None and chosen.executable == "/p12.7"


@pytest.mark.parametrize(
    ("system", "names"),
    [("Windows", "python.org/downloads/windows"), ("Darwin", "brew install python@3.12"), ("Linux", "python3-venv")],
)
def test_install_advice_names_what_to_install(system: str, names: str) -> None:
    text = pythons.install_advice(system, ["Python 3.9.6 (/usr/bin/python3) is too old"])
    assert names in text and "3.9.6" in text


# --- the machine and the PyTorch build --------------------------------------------------------------

SMI = """Tue Dec  2 10:00:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.86.15              Driver Version: 570.86.15      CUDA Version: 12.8     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|=========================================+========================+======================|
|   0  NVIDIA GeForce RTX 4090        Off |   00000000:01:00.0  On |                  Off |
|   1  NVIDIA RTX A6000               On  |   00000000:02:00.0 Off |                  Off |
+-----------------------------------------+------------------------+----------------------+
"""


def test_nvidia_smi_gives_the_cuda_version_and_the_gpus() -> None:
    assert machine.parse_nvidia_smi(SMI) == ((12, 8), ("NVIDIA GeForce RTX 4090", "NVIDIA RTX A6000"))
    listed = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)\n"
    assert machine.parse_nvidia_smi(listed) == (None, ("NVIDIA H100 80GB HBM3",))
    assert machine.parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver") == (
        None,
        (),
    )
    assert machine.parse_rocm_version("6.4.1-120\n") == (6, 4)
    assert machine.normalise_arch("AMD64") == "x86_64" and machine.normalise_arch("aarch64") == "arm64"


def linux(cuda=None, rocm=None, arch="x86_64", system="Linux") -> Machine:
    return Machine(system, arch, cuda, (), rocm)


@pytest.mark.parametrize(
    ("facts", "build", "requirement", "index"),
    [
        (linux((12, 8)), "cu128", "torch==2.13.0+cu128", "https://download.pytorch.org/whl/cu128"),
        (linux((12, 9)), "cu128", "torch==2.13.0+cu128", "https://download.pytorch.org/whl/cu128"),
        (linux((13, 1)), "cu130", "torch==2.13.0+cu130", "https://download.pytorch.org/whl/cu130"),
        (linux((12, 6)), "cu126", "torch==2.13.0+cu126", "https://download.pytorch.org/whl/cu126"),
        (linux(rocm=(6, 4)), "rocm6.4", "torch==2.13.0+rocm6.4", "https://download.pytorch.org/whl/rocm6.4"),
        (linux(rocm=(7, 2)), "rocm7.1", "torch==2.13.0+rocm7.1", "https://download.pytorch.org/whl/rocm7.1"),
        (linux(), "cpu", "torch==2.13.0+cpu", "https://download.pytorch.org/whl/cpu"),
        (linux(arch="arm64"), "cpu", "torch==2.13.0", None),
        (linux((12, 8), system="Windows"), "cu128", "torch==2.13.0+cu128", "https://download.pytorch.org/whl/cu128"),
        (linux(system="Windows"), "cpu", "torch==2.13.0+cpu", "https://download.pytorch.org/whl/cpu"),
        (linux(arch="arm64", system="Darwin"), "mps", "torch==2.13.0", None),
    ],
)
def test_the_torch_build_and_index_for_each_machine(facts: Machine, build: str, requirement: str, index) -> None:
    choice = tb.choose_torch(facts)
    assert (choice.build, choice.requirement, choice.index_url) == (build, requirement, index)
    assert choice.pip_args[0] == requirement and (("--index-url" in choice.pip_args) == (index is not None))
    assert choice.download_bytes > 0 and choice.install_bytes > choice.download_bytes
    assert (choice.warning is not None) == (build == "cpu")


def test_an_old_driver_gets_the_cpu_build_and_says_to_update_the_driver() -> None:
    choice = tb.choose_torch(linux((12, 2)))
    assert (
        choice.build == "cpu"
        and "CUDA 12.2" in (choice.warning or "")
        and "Update the NVIDIA driver" in (choice.warning or "")
    )


def test_windows_cuda_sizes_and_no_rocm_on_windows() -> None:
    assert tb.choose_torch(linux((12, 8), system="Windows")).download_bytes == tb.WINDOWS_CUDA_SIZES[0]
    assert tb.choose_torch(linux(rocm=(6, 4), system="Windows")).build == "cpu"


def test_pip_config_index_keeps_the_pin_without_a_label_and_a_build_can_be_forced() -> None:
    choice = tb.choose_torch(linux(), index="pip")
    assert choice.requirement == "torch==2.13.0" and choice.index_url is None and choice.pip_args == ["torch==2.13.0"]
    mirror = tb.choose_torch(linux((12, 8)), index="https://mirror.example/whl/cu128")
    assert mirror.index_url == "https://mirror.example/whl/cu128" and mirror.requirement.endswith("+cu128")
    forced = tb.choose_torch(linux((12, 8)), build="cpu")
    assert forced.build == "cpu" and "by hand" in (forced.warning or "")
    assert tb.choose_torch(linux(), build="cu126").device == "cuda"


@pytest.mark.parametrize(
    ("facts", "build", "why"),
    [
        (linux(arch="x86_64", system="Darwin"), "auto", "Intel Macs"),
        (linux(system="FreeBSD"), "auto", "no build for FreeBSD"),
        (linux(), "cu99", "Unknown PyTorch build"),
    ],
)
def test_machines_without_a_torch_build_say_what_to_do(facts: Machine, build: str, why: str) -> None:
    with pytest.raises(tb.SetupProblem) as info:
        tb.choose_torch(facts, build)
    assert why in info.value.why and info.value.what


@pytest.mark.parametrize(
    ("installed", "facts", "ok"),
    [
        ("2.13.0+cu128", linux((12, 8)), True),
        ("2.13.0+cpu", linux((12, 8)), False),
        ("2.13.0", linux((12, 8)), True),  # PyPI's Linux build is a CUDA build
        ("2.13.0", linux((12, 8), system="Windows"), False),  # PyPI's Windows build is CPU only
        ("2.12.1+cu126", linux((12, 8)), True),  # another version of the right kind: fits, noted
        (None, linux(), False),
        ("2.13.0", linux(arch="arm64", system="Darwin"), True),
    ],
)
def test_whether_the_installed_torch_fits(installed, facts: Machine, ok: bool) -> None:
    assert tb.fits(installed, tb.choose_torch(facts), facts.system)[0] is ok


# --- models, the cache, checksums ---------------------------------------------------------------


def test_select_files_takes_fp16_weights_when_there_are_some_and_never_the_single_file() -> None:
    names = ["model_index.json", "sd_xl_refiner_1.0.safetensors", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "vae/diffusion_pytorch_model.fp16.safetensors", "tokenizer_2/merges.txt", "README.md"]  # fmt: skip
    chosen = [f.name for f in hub.select_files(RemoteFile(n, 1) for n in names)]
    fp16 = ["unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert chosen == ["model_index.json", "tokenizer_2/merges.txt", "unet/config.json", *fp16]
    plain = [f.name for f in hub.select_files(RemoteFile(n, 1) for n in names if ".fp16." not in n)]
    assert "unet/diffusion_pytorch_model.safetensors" in plain and "sd_xl_refiner_1.0.safetensors" not in plain


def test_hf_cache_dir_follows_huggingface_hub() -> None:
    assert hub.hf_cache_dir({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}) == Path("/a")
    assert hub.hf_cache_dir({"HF_HOME": "/b"}) == Path("/b/hub")
    assert hub.hf_cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/huggingface/hub")
    assert hub.hf_cache_dir({}, home="/home/ann") == Path("/home/ann/.cache/huggingface/hub")


def test_verify_checks_size_sha256_and_the_git_blob_id(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"weights" * 1000)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    assert hub.verify(path, RemoteFile("unet/w.safetensors", len(data), sha, "x")) is None
    assert hub.verify(path, RemoteFile("config.json", len(data), None, blob)) is None
    assert "SHA-256" in (hub.verify(path, RemoteFile("w", len(data), "0" * 64)) or "")
    assert "git SHA-1" in (hub.verify(path, RemoteFile("c", len(data), None, "0" * 40)) or "")
    assert "bytes on disk" in (hub.verify(path, RemoteFile("c", 1, sha)) or "")


def test_snapshot_ready_needs_refs_and_weights(tmp_path: Path) -> None:
    repo = hub.repo_folder(tmp_path, hub.REFINER_REPO)
    assert not hub.snapshot_ready(tmp_path, hub.REFINER_REPO)
    snap = repo / "snapshots" / "abc"
    for name in ("model_index.json", "unet/w.safetensors", "vae/w.safetensors"):
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_text("x")
    assert not hub.snapshot_ready(tmp_path, hub.REFINER_REPO)  # no refs/main
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    assert hub.snapshot_ready(tmp_path, hub.REFINER_REPO)


# --- disk space ---------------------------------------------------------------------------------


def test_check_space_sums_what_goes_on_one_disk() -> None:
    needs = [
        Need(Path("/venv"), 6_000_000_000, "PyTorch"),
        Need(Path("/hf"), 6_080_000_000, "the refiner", "set HF_HOME"),
    ]
    one_disk = check_space(needs, free=lambda p: 10_000_000_000, device=lambda p: 1)
    assert len(one_disk) == 1 and "12.08 GB in" not in one_disk[0] and "10.00 GB is free" in one_disk[0]
    assert "set HF_HOME" in one_disk[0] and "choose another folder" in one_disk[0]
    two_disks = check_space(needs, free=lambda p: 10_000_000_000, device=lambda p: str(p))
    assert two_disks == []
    full = check_space([needs[1]], free=lambda p: 5_000_000_000, device=lambda p: 1)
    assert "the refiner (6.08 GB in /hf)" in full[0] and "5.00 GB is free" in full[0]
    assert check_space([Need(Path("/x"), 0, "nothing")], free=lambda p: 0, device=lambda p: 1) == []
    assert (human(6_080_000_000), human(512_000_000), human(900)) == ("6.08 GB", "512 MB", "900 bytes")


def test_check_space_reads_a_real_disk(tmp_path: Path) -> None:
    assert check_space([Need(tmp_path / "not" / "yet", 1000, "a little")]) == []
    assert check_space([Need(tmp_path, 10**18, "an exabyte")])  # more than any disk here


# --- the steps ----------------------------------------------------------------------------------

PY = pythons.PythonInfo("/usr/bin/python3.12", (3, 12, 1))
CPU = tb.choose_torch(linux(), index="pip")
WHEEL = steps.BackendSource("/plugin/_wheels/krita_sdxl-0.1.0-py3-none-any.whl", "abc")


def plan(tmp_path: Path, done=None, mode="install", ready=None, base=False, python=PY, system="Linux", torch=CPU):
    models = hub.models(base)
    return steps.build_plan(tmp_path / "setup", system, python, linux(), torch, WHEEL, models,
                            ready or {}, tmp_path / "hf", done or {}, mode)  # fmt: skip


def done_of(p: steps.Plan) -> dict[str, str]:
    return {s.key: s.fingerprint for s in p.steps if s.fingerprint}


def test_a_fresh_plan_runs_every_step_and_says_what_it_downloads(tmp_path: Path) -> None:
    p = plan(tmp_path)
    assert [s.key for s in p.pending] == ["venv", "torch", "backend", "models", "service"]
    venv = str(tmp_path / "setup" / "venv")
    assert p.step("venv").commands == (("/usr/bin/python3.12", "-m", "venv", venv),)
    torch_cmd = p.step("torch").commands[0]
    assert torch_cmd[0] == venv + "/bin/python" and torch_cmd[-1] == "torch==2.13.0" and "--index-url" not in torch_cmd
    backend = p.step("backend").commands
    assert backend[0][-2:] == (WHEEL.path, "torch==2.13.0")  # torch stays the build just installed
    assert "--force-reinstall" in backend[1] and backend[2][-3:] == ("setup", "check", "--json")
    assert p.step("models").commands[0][-3:] == ("setup", "download", "--json-progress")
    assert p.download_bytes == CPU.download_bytes + tb.OTHER_PACKAGES[0] + hub.REFINER.approx_bytes
    text = p.describe()
    assert "Create the Python environment" in text and "about 6.08 GB" in text and "⚠" in text  # the CPU warning
    assert p.needs[1].bytes == hub.REFINER.approx_bytes


def test_update_skips_what_is_done_and_redoes_what_changed(tmp_path: Path) -> None:
    first = plan(tmp_path, ready={hub.REFINER_REPO: True})
    done = done_of(first)
    again = plan(tmp_path, done=done, ready={hub.REFINER_REPO: True})
    assert [s.key for s in again.pending] == ["service"] and again.download_bytes == 0
    assert "Nothing to download" in again.describe()
    with_base = plan(tmp_path, done=done, ready={hub.REFINER_REPO: True}, base=True)
    assert [s.key for s in with_base.pending] == ["models", "service"]
    assert with_base.step("models").commands[0][-1] == "--base" and with_base.download_bytes == hub.BASE.approx_bytes
    gpu = plan(tmp_path, done=done, ready={hub.REFINER_REPO: True}, torch=tb.choose_torch(linux((12, 8))))
    assert [s.key for s in gpu.pending] == ["torch", "service"]
    gone = plan(tmp_path, done=done, ready={hub.REFINER_REPO: False})  # the cache was emptied
    assert [s.key for s in gone.pending] == ["models", "service"]


def test_repair_runs_everything_and_verifies_every_model_file(tmp_path: Path) -> None:
    p = plan(tmp_path, done=done_of(plan(tmp_path)), mode="repair")
    assert len(p.pending) == 5 and p.step("models").commands[0][-1] == "--verify"
    assert "--clear" not in p.step("venv").commands[0]


def test_another_python_rebuilds_the_environment_and_everything_in_it(tmp_path: Path) -> None:
    done = done_of(plan(tmp_path, ready={hub.REFINER_REPO: True}))
    other = pythons.PythonInfo("/usr/bin/python3.11", (3, 11, 2))
    p = plan(tmp_path, done=done, ready={hub.REFINER_REPO: True}, python=other)
    assert "--clear" in p.step("venv").commands[0] and len(p.pending) == 5


def test_windows_steps_use_the_scripts_python(tmp_path: Path) -> None:
    p = plan(tmp_path, system="Windows", python=pythons.PythonInfo(r"C:\Python312\python.exe", (3, 12, 1)))
    assert p.python.endswith(r"venv\Scripts\python.exe")
    assert p.step("torch").commands[0][0] == p.python
    assert steps.venv_python("/opt/x", "Darwin") == "/opt/x/bin/python"


def test_the_state_file_marks_steps_and_survives_garbage(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    assert steps.read_state(folder) == {}
    steps.mark(folder, "venv", "fp1", "/py")
    steps.mark(folder, "torch", "fp2")
    assert steps.read_state(folder) == {"venv": "fp1", "torch": "fp2"}
    steps.mark(folder, "torch", None)  # started again: not done until it ends well
    assert steps.read_state(folder) == {"venv": "fp1"}
    assert not steps.is_set_up(folder)
    assert steps.done_steps(folder, "Linux") == {}  # the state says venv, but there is no venv
    (folder / steps.STATE_FILE).write_text("{not json")
    assert steps.read_state(folder) == {}


def test_find_backend_prefers_the_named_wheel_then_the_plugins_own(tmp_path: Path) -> None:
    plugin = tmp_path / "pykrita" / "krita_sdxl_refiner"
    (plugin / steps.WHEELS_DIR).mkdir(parents=True)
    with pytest.raises(tb.SetupProblem, match="carries no backend"):
        steps.find_backend(plugin, {})
    wheel = plugin / steps.WHEELS_DIR / steps.wheel_name()
    wheel.write_bytes(b"zip")
    found = steps.find_backend(plugin, {})
    assert found.path == str(wheel) and found.fingerprint == hashlib.sha256(b"zip").hexdigest()
    other = tmp_path / "krita_sdxl-0.1.0-py3-none-any.whl"
    other.write_bytes(b"other")
    assert steps.find_backend(plugin, {steps.BACKEND_WHEEL_ENV: str(other)}).path == str(other)
    with pytest.raises(tb.SetupProblem, match=r"neither a \.whl"):
        steps.find_backend(plugin, {steps.BACKEND_WHEEL_ENV: str(tmp_path / "nope")})
    checkout = Path(__file__).resolve().parents[1] / "krita_plugin" / "krita_sdxl_refiner"
    source = steps.find_backend(checkout, {})
    assert source.path == str(checkout.parent.parent) and source.fingerprint is None  # always reinstalled


def test_judging_the_checks() -> None:
    gpu = tb.choose_torch(linux((12, 8)))
    ok = json.dumps({"torch": "2.13.0+cu128", "cuda": "12.8", "gpu": True, "mps": False})
    assert steps.judge_torch("pip noise\n" + ok, gpu) == (None, None)
    blind = json.dumps({"torch": "2.13.0+cu128", "cuda": "12.8", "gpu": False, "mps": False})
    assert "does not see the GPU" in (steps.judge_torch(blind, gpu)[1] or "")
    assert "does not import" in (steps.judge_torch("Traceback ...", gpu)[0] or "")
    assert steps.judge_backend(json.dumps({"backend_version": VERSION, "problems": []})) is None
    assert "version 0.0.1" in (steps.judge_backend(json.dumps({"backend_version": "0.0.1"})) or "")
    assert "does not run" in (steps.judge_backend("ModuleNotFoundError: krita_sdxl") or "")


# --- failures, events, processes ----------------------------------------------------------------

PIP_NO_BUILD = """Looking in indexes: https://download.pytorch.org/whl/cu128
ERROR: Could not find a version that satisfies the requirement torch==2.13.0+cu128 (from versions: none)
ERROR: No matching distribution found for torch==2.13.0+cu128"""


@pytest.mark.parametrize(
    ("key", "code", "output", "why", "what"),
    [
        ("torch", 1, PIP_NO_BUILD, "no torch==2.13.0+cu128", "3.10 to 3.13"),
        ("torch", 1, "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device",
         "disk is full", "Free some space"),
        ("backend", 1, "WARNING: Retrying ... Failed to establish a new connection: [Errno -2] Name or service not "
         "known", "could not be reached", "internet connection"),
        ("venv", 1, "Error: Command '['/x/venv/bin/python', '-m', 'ensurepip']' returned non-zero exit status 1.\n"
         "The virtual environment was not created successfully because ensurepip is not available.",
         "no ensurepip", "python3-venv"),
        ("torch", 1, "ERROR: Cannot install torch==2.13.0 because these package versions have conflicting "
         "dependencies.\n\nThe conflict is caused by:\n    The user requested torch==2.13.0\n    The user requested "
         "(constraint) torch<=2.14.1\n\nTo fix this you could try to:\n1. loosen the range\n\nERROR: "
         "ResolutionImpossible: for help visit https://pip.pypa.io", "pip could not install torch==2.13.0: no version "
         "fits (The user requested torch==2.13.0; The user requested (constraint) torch<=2.14.1)", "constraints"),
        ("torch", 1, "ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE.", "damaged",
         "Repair"),
        ("torch", None, "No such file or directory", "could not be started", "Repair"),
        ("torch", 2, "something odd\nthe last line", "code 2: the last line", "Repair"),
        ("models", 1, events.line("plan", files=1) + "\n" + events.line("error", why="the disk is full", what="Free"),
         "the disk is full", "Free"),
    ],
)  # fmt: skip
def test_a_failed_step_says_which_why_and_what_to_do(key, code, output, why, what) -> None:
    failure = failures.explain(key, "The step", code, output, "/s/setup.log")
    assert why in failure.why and what in failure.what and "/s/setup.log" in failure.what
    assert failure.text.startswith("“The step” failed: ")


def test_events_round_trip_and_other_lines_are_not_events() -> None:
    text = events.line("progress", done=5, needed=10)
    assert events.parse(text) == {"event": "progress", "done": 5, "needed": 10}
    assert events.parse("Collecting torch==2.13.0") is None and events.parse('{"event": "other"}') is None
    with pytest.raises(ValueError):
        events.line("unknown")


def test_clean_env_keeps_krita_python_out_of_other_pythons() -> None:
    env = {"PYTHONHOME": "/krita", "PYTHONPATH": "/krita/lib", "PATH": "/usr/bin", "HF_HOME": "/hf", "HOME": "/h"}
    out = procenv.clean_env(env, "Windows")
    assert "PYTHONHOME" not in out and "PYTHONPATH" not in out and out["HF_HOME"] == "/hf"
    assert out["PYTHONUNBUFFERED"] == "1" and out["PYTHONIOENCODING"] == "utf-8"
    appimage = {"APPDIR": "/tmp/.mount_krita", "PATH": os.pathsep.join(["/tmp/.mount_krita/usr/bin", "/usr/bin"]),
                "LD_LIBRARY_PATH": "/tmp/.mount_krita/usr/lib"}  # fmt: skip
    out = procenv.clean_env(appimage, "Linux")
    assert out["PATH"] == "/usr/bin" and "LD_LIBRARY_PATH" not in out
    assert procenv.clean_env({"APPDIR": "/a", "PATH": "/a/bin"}, "Linux")["PATH"] == procenv.DEFAULT_PATH


def test_backend_version_mismatch_says_update() -> None:
    assert mismatch(VERSION) is None
    assert "Update" in (mismatch("0.0.9") or "") and "0.0.9" in (mismatch("0.0.9") or "")
    assert "an older version" in (mismatch(None) or "")
