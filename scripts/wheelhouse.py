#!/usr/bin/env python3
"""Offline install: build a wheelhouse here (for another platform / Python if needed), install from it there.

Standard library only (it runs on the target before anything is installed). Two steps::

    # here, with internet: CPython 3.12 manylinux x86-64 target that already has a CUDA torch
    python scripts/wheelhouse.py build --out wheels --set run --python-version 3.12 --skip-torch
    # there, without internet (into the current environment, or --target DIR added to PYTHONPATH)
    python scripts/wheelhouse.py install wheels [--target DIR]

Sets (versions: ``requirements.txt`` / ``requirements-nodeps.txt`` for the direct requirements, the
versions installed here for their dependencies; the dependency closure is walked in the installed
metadata with the TARGET's Python version for the markers):

* ``full``: everything ``requirements.txt`` and ``requirements-nodeps.txt`` install (tests, MLflow,
  serving, the embedded dataset's template wheels).
* ``run``: what ``python -m monai.bundle run training`` and the evaluation (``nexus-sr evaluate`` /
  ``experiment`` / ``python -m nexus_monai.ops.gpu_run``) import without MLflow tracking: monai,
  pytorch-ignite, nibabel, fire (``python -m monai.bundle``) and numpy, scipy, pandas, pyyaml, tqdm,
  pillow, with their dependencies. SimpleITK (a 53 MB wheel) only with ``--with-simpleitk``: without it
  trilinear / nearest run in torch with ITK's semantics, cubic is unavailable.

``--skip-torch`` leaves out torch, torchvision, lpips and torch's own dependency closure (the target
has a CUDA torch); ``--skip A,B`` leaves out more (packages the target already has, e.g.
``--skip numpy,scipy,pandas,pyyaml,tqdm,pillow`` for a PyTorch image that ships them). ``--from-env``
repacks the distributions installed HERE as wheels (no network; only for a target of this machine's
platform and Python). ``--project`` adds the nexus_monai wheel itself. Every build writes
``wheelhouse.json`` (files, versions, sizes, target, the import names ``install`` checks).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.metadata as md
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
RUN_ROOTS = ("monai", "pytorch-ignite", "nibabel", "fire", "numpy", "scipy", "pandas", "pyyaml", "tqdm", "pillow")
RUN_IMPORTS = {"monai": "monai", "pytorch-ignite": "ignite", "nibabel": "nibabel", "fire": "fire", "numpy": "numpy",
               "scipy": "scipy", "pandas": "pandas", "pyyaml": "yaml", "tqdm": "tqdm", "pillow": "PIL",
               "simpleitk": "SimpleITK", "torch": "torch"}
TORCH_NAMES = ("torch", "torchvision", "lpips")
MIB = 1 << 20


def norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(path: Path) -> dict[str, str]:
    """``{normalised name: version}`` of the ``NAME==VERSION`` lines of a requirements file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)", line)
        if m:
            out[norm(m.group(1))] = m.group(2)
    return out


_REQ = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(\[[^\]]*\])?\s*(\(?[^;]*\)?)?\s*(;\s*(.*))?$")


def _marker_ok(marker: str | None, python_version: str) -> bool:
    """Evaluate a requirement's environment marker for a Linux CPython target ``python_version`` (X.Y);
    requirements of extras are never followed."""
    if not marker:
        return True
    if "extra" in marker:
        return False
    env = {"python_version": python_version, "python_full_version": python_version + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    try:
        from packaging.markers import Marker  # pip vendors packaging; a plain install usually has it too
    except ImportError:
        from pip._vendor.packaging.markers import Marker
    return Marker(marker).evaluate(env)


def closure(roots, python_version: str, exclude=()) -> dict[str, str]:
    """``{normalised name: installed version}`` of ``roots`` and their dependencies (installed metadata here),
    without ``exclude`` and without what is reached only through it."""
    excluded = {norm(e) for e in exclude}
    todo, seen, missing = [norm(r) for r in roots], {}, []
    while todo:
        name = todo.pop()
        if name in seen or name in excluded:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
            continue
        seen[name] = dist.version
        for req in dist.requires or []:
            m = _REQ.match(req)
            if m and _marker_ok(m.group(5), python_version):
                todo.append(norm(m.group(1)))
    if missing:
        raise SystemExit(f"error: not installed here, cannot pin: {', '.join(sorted(set(missing)))}")
    return seen


def torch_closure(python_version: str) -> set[str]:
    """torch, torchvision, lpips and everything torch itself pulls (the target's CUDA torch has them)."""
    try:
        names = set(closure(["torch"], python_version))  # torch's own dependencies (not torchvision's / lpips')
    except SystemExit:
        names = set()
    return names | {norm(n) for n in TORCH_NAMES}


def requested(args) -> dict[str, str]:
    """The set's ``{name: version}`` (direct pins from the requirements files win)."""
    pins = {**pinned(REPO / "requirements.txt"), **pinned(REPO / "requirements-nodeps.txt")}
    exclude = {norm(s) for s in (args.skip or "").split(",") if s.strip()}
    if args.skip_torch:
        exclude |= torch_closure(args.python_version)
    roots = list(RUN_ROOTS) + (["simpleitk"] if args.with_simpleitk else [])
    if args.set == "full":
        roots = list(pinned(REPO / "requirements.txt"))
    found = closure(roots, args.python_version, exclude)
    if args.set == "full":  # --no-deps requirements: themselves only
        found.update({n: v for n, v in pinned(REPO / "requirements-nodeps.txt").items() if n not in exclude})
    if args.only:
        keep = {norm(n) for n in args.only.split(",")}
        found = {n: v for n, v in found.items() if n in keep}
    return {n: pins.get(n, v) for n, v in sorted(found.items())}


def wheel_from_installed(name: str, out: Path) -> Path:
    """Repack an installed distribution (its RECORD) as a wheel with its original tags (``--from-env``)."""
    dist = md.distribution(name)
    base = Path(dist.locate_file(""))
    files = [f for f in dist.files or [] if not str(f).startswith("..") and "__pycache__" not in str(f)
             and not str(f).endswith(".pyc")]
    info = next(f for f in dist.files if str(f).endswith(".dist-info/METADATA")).parent
    wheel_meta = (base / info / "WHEEL").read_text() if (base / info / "WHEEL").exists() else ""
    tags = [line.split(":", 1)[1].strip() for line in wheel_meta.splitlines() if line.startswith("Tag:")]
    tags = tags or ["py3-none-any"]
    dist_name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    path = out / f"{dist_name}-{dist.version}-{tags[0]}.whl"
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            rel = str(f)
            if rel.endswith(".dist-info/RECORD") or not (base / rel).is_file():
                continue
            data = (base / rel).read_bytes()
            zf.writestr(rel, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            writer.writerow([rel, f"sha256={digest}", len(data)])
        writer.writerow([f"{info}/RECORD", "", ""])
        zf.writestr(f"{info}/RECORD", record.getvalue())
    return path


def _pip_download(name: str, version: str, args, out: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(out),
           "--python-version", args.python_version, "--implementation", "cp", f"{name}=={version}", "-q"]
    for plat in args.platform or PLATFORMS:
        cmd += ["--platform", plat]
    cmd += args.pip_arg or []
    subprocess.run(cmd, check=True)


def build(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = requested(args)
    local = f"{sys.version_info.major}.{sys.version_info.minor}"
    if args.from_env and args.python_version != local:
        raise SystemExit(f"error: --from-env repacks this machine's packages (Python {local}), "
                         f"not for Python {args.python_version}")
    before = {p.name for p in out.glob("*.whl")}
    failed = []
    for name, version in wanted.items():
        try:
            if args.from_env:
                if md.version(name) != version:
                    raise RuntimeError(f"installed {md.version(name)}, pinned {version}")
                wheel_from_installed(name, out)
            else:
                _pip_download(name, version, args, out)
        except (subprocess.CalledProcessError, RuntimeError, StopIteration) as err:
            failed.append(f"{name}=={version} ({err})")
    if args.project:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                        "-w", str(out), str(REPO)], check=True)
    wheels = []
    for p in sorted(out.glob("*.whl")):
        dist = norm(p.name.split("-")[0])
        wheels.append({"file": p.name, "name": dist, "version": p.name.split("-")[1], "bytes": p.stat().st_size,
                       "new": p.name not in before})
    names = {w["name"] for w in wheels}
    manifest = {"set": args.set, "python_version": args.python_version,
                "platforms": ["this machine"] if args.from_env else list(args.platform or PLATFORMS),
                "skip_torch": bool(args.skip_torch),
                "skipped": sorted(s for s in (args.skip or "").split(",") if s),
                "imports": sorted({RUN_IMPORTS[n] for n in names if n in RUN_IMPORTS}
                                  | ({"nexus_monai"} if args.project else set())),
                "wheels": wheels, "total_bytes": sum(w["bytes"] for w in wheels), "failed": failed}
    (out / "wheelhouse.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for w in sorted(wheels, key=lambda w: -w["bytes"]):
        print(f"{w['bytes'] / MIB:8.2f} MiB  {w['file']}")
    print(f"{manifest['total_bytes'] / MIB:8.2f} MiB  total ({len(wheels)} wheels) in {out}")
    if failed:
        print("error: no wheel for: " + "; ".join(failed), file=sys.stderr)
        return 2
    return 0


def install(args) -> int:
    """``pip install --no-index --no-deps`` every wheel of the wheelhouse (nothing is downloaded), then import
    each of the set's modules in a fresh interpreter; a missing one is a one-line error, exit 2."""
    wh = Path(args.wheelhouse)
    try:
        manifest = json.loads((wh / "wheelhouse.json").read_text())
    except (OSError, ValueError):
        print(f"error: {wh / 'wheelhouse.json'}: missing or unreadable (build the wheelhouse first)", file=sys.stderr)
        return 2
    files = [str(wh / w["file"]) for w in manifest["wheels"]]
    absent = [f for f in files if not Path(f).is_file()]
    if absent:
        print(f"error: {wh}: wheel missing: {Path(absent[0]).name}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wh), "-q",
           "--disable-pip-version-check"]
    if args.target:
        cmd += ["--target", str(args.target), "--upgrade"]
    if args.force_reinstall:
        cmd += ["--force-reinstall"]
    if files:
        subprocess.run(cmd + files, check=True)
    env = dict(os.environ)
    if args.target:
        rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.target).resolve())] + rest)
    mods = manifest["imports"] + (["torch"] if manifest.get("skip_torch") else [])
    probe = ("import importlib, sys\nbad = []\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
             "    except Exception as e:\n        bad.append(f'{m} ({type(e).__name__}: {e})')\n"
             "print('; '.join(bad))\nsys.exit(1 if bad else 0)\n")
    res = subprocess.run([sys.executable, "-c", probe, *mods], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"error: {wh}: installed, but cannot import: {res.stdout.strip() or res.stderr.strip()[-300:]}",
              file=sys.stderr)
        return 2
    print(f"installed {len(files)} wheels from {wh} ({manifest['total_bytes'] / MIB:.1f} MiB); "
          f"imports ok: {', '.join(mods)}" + (f"; add {args.target} to PYTHONPATH" if args.target else ""))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download (or repack) the wheels of a set for a target platform / Python")
    b.add_argument("--out", required=True)
    b.add_argument("--set", choices=("run", "full"), default="run")
    b.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    b.add_argument("--platform", action="append",
                   help=f"pip --platform tag (repeatable; default {', '.join(PLATFORMS)})")
    b.add_argument("--skip-torch", action="store_true", help="the target already has a (CUDA) torch")
    b.add_argument("--skip", default="", help="comma-separated distributions the target already has")
    b.add_argument("--with-simpleitk", action="store_true", help="add SimpleITK to the run set (53 MB)")
    b.add_argument("--only", default="", help="comma-separated: build only these of the set")
    b.add_argument("--from-env", action="store_true", help="repack this environment's installed packages (no network)")
    b.add_argument("--project", action="store_true", help="add the nexus_monai wheel")
    b.add_argument("--pip-arg", action="append", help="extra argument for pip download (e.g. --index-url=...)")
    i = sub.add_parser("install", help="install a wheelhouse with pip --no-index (no network), then check imports")
    i.add_argument("wheelhouse")
    i.add_argument("--target", help="pip --target folder instead of the current environment")
    i.add_argument("--force-reinstall", action="store_true")
    args = p.parse_args(argv)
    return build(args) if args.command == "build" else install(args)


if __name__ == "__main__":
    sys.exit(main())
