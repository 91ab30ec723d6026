"""Operations drivers: how the project's runs are carried to and executed on other machines
(:mod:`nexus_monai.ops.gpu_run`: pack here, train + evaluate on an offline GPU server). Entry points, layer 4."""
