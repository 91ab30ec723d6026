"""What ``nexus-sr <command> --help`` says: a one-line description, an example, help on every option
and its default.

:class:`HelpfulParser` is the ``argparse.ArgumentParser`` of ``nexus-sr``; its sub-command parsers
(argparse builds them with the parent's class) take their description and example epilog from
:data:`DESCRIPTIONS` and :data:`EXAMPLES`, options declared without ``help`` take it from
:data:`OPTION_HELP`, and :class:`HelpFormatter` shows every option's default.
"""

from __future__ import annotations

import argparse

__all__ = ["DESCRIPTIONS", "EXAMPLES", "OPTION_HELP", "HelpFormatter", "HelpfulParser"]

DESCRIPTIONS = {
    "synth": "Write the embedded simulated BraTS-format dataset (MNI152 template anatomy; not patient data).",
    "degrade": "Simulate a thick-slice low-resolution acquisition of a high-resolution scan.",
    "upsample": "Interpolate a scan onto another grid (trilinear, cubic B-spline or nearest; SimpleITK).",
    "baseline": "Super-resolve one thick-slice scan: LRTV or SMORE per scan, SAINT or I3Net from a trained bundle.",
    "predict": "Super-resolve a subject's T1w + T2w low-resolution scans onto any grid with a trained INR bundle.",
    "evaluate": ("Table 1: simulate the protocol's LR inputs, run the methods, write tables, panels and an MLflow "
                 "run (Table 5: nexus-sr experiment table5)."),
    "benchmark": "Time and measure memory of Nexus-INR whole-volume inference vs trilinear, and training steps/s.",
    "serve": "Serve trained bundles as a MONAI-Label-style REST service (GET /info/, POST /infer/{model}).",
    "fit-subject": "SSMCSR: fit a subject-specific INR on one subject's T1w + T2w LR scans, write both SR volumes.",
    "experiment": ("Reproduce the Nexus-INR paper's Tables 2-5: train every row and seed, score the test split, "
                   "tabulate."),
}

EXAMPLES = {
    "synth": "nexus-sr synth --out data/embedded --subjects 24 --seed 0 --size small",
    "degrade": "nexus-sr degrade --image sub01_t1.nii.gz --axis z --factor 2 --noise 0.02 --out sub01_t1_lr.nii.gz",
    "upsample": "nexus-sr upsample --image sub01_t1_lr.nii.gz --method cubic --spacing 1 --out sub01_t1_cubic.nii.gz",
    "baseline": ("nexus-sr baseline --method smore --image sub01_t2_lr.nii.gz --like sub01_t1.nii.gz "
                 "--out sub01_t2_smore.nii.gz"),
    "predict": ("nexus-sr predict --bundle bundles/nexus_inr --t1 t1_lr.nii.gz --t2 t2_lr.nii.gz --spacing 0.5 "
                "--out sr/"),
    "evaluate": ("nexus-sr evaluate --data embedded --split test --methods trilinear,ibp,cubic,nexus_inr "
                 "--protocol nexus --out results/table1"),
    "benchmark": "nexus-sr benchmark --bundle bundles/nexus_inr --json benchmark.json",
    "serve": "nexus-sr serve --bundle bundles/nexus_inr --port 8000",
    "fit-subject": ("nexus-sr fit-subject --t1 t1_lr.nii.gz --t2 t2_lr.nii.gz --variant split_head --spacing 1 "
                    "--out ssmcsr/"),
    "experiment": "nexus-sr experiment table2 --seeds 0 --max-epochs 20 --out results/table2",
}

OPTION_HELP = {
    ("synth", "--out"): "output folder of the dataset (subject folders, dataset.json, README.txt, montage.png)",
    ("synth", "--subjects"): "number of simulated subjects",
    ("synth", "--seed"): "random seed: the same seed gives the same dataset",
    ("degrade", "--image"): "high-resolution NIfTI to degrade",
    ("degrade", "--profile"): "slice profile along the thick axis (gaussian: FWHM = factor; boxcar: slab mean; none)",
    ("degrade", "--seed"): "random seed of the noise",
    ("degrade", "--out"): "output NIfTI (written under a temporary name, then renamed)",
    ("upsample", "--image"): "NIfTI to interpolate",
    ("upsample", "--method"): "interpolation (cubic and bspline are the same cubic B-spline)",
    ("upsample", "--out"): "output NIfTI",
    ("baseline", "--method"): "lrtv and smore work per scan (no training); saint and i3net need their trained bundle",
    ("baseline", "--image"): "thick-slice LR NIfTI (the thick axis is read from its affine)",
    ("baseline", "--out"): "output NIfTI",
    ("predict", "--quiet"): "no progress bar",
    ("evaluate", "--max-subjects"): "evaluate at most this many subjects of the split (default: all)",
    ("evaluate", "--quiet"): "no progress bar",
    ("evaluate", "--out"): "output folder: per_subject.csv, table1.csv, table1.md, panel_*.png",
    ("serve", "--log-level"): "uvicorn log level",
    ("fit-subject", "--variant"): "split_head (the paper's), vanilla (one head) or single (one INR per contrast)",
    ("fit-subject", "--seed"): "random seed of the INR initialisation and sampling",
    ("fit-subject", "--quiet"): "no progress bar",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: ...)`` after an option's help unless the help already states its default,
    the default is empty (None, False) or the option is suppressed; keeps the example epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return super()._get_help_string(action)


class HelpfulParser(argparse.ArgumentParser):
    """``ArgumentParser`` that fills descriptions, examples and missing option help from this module's tables."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        command = self.prog.split()[-1]
        self._command = command
        if command in DESCRIPTIONS and self.description is None:
            self.description = DESCRIPTIONS[command]
        if command in EXAMPLES and self.epilog is None:
            self.epilog = f"example:\n  {EXAMPLES[command]}"

    def add_argument(self, *args, **kwargs):
        if not kwargs.get("help"):
            for option in args:
                if (self._command, option) in OPTION_HELP:
                    kwargs["help"] = OPTION_HELP[(self._command, option)]
                    break
        return super().add_argument(*args, **kwargs)
