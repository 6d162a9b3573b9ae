import noether_wrap
from noether_wrap import embeddings


def test_public_names_are_pinned() -> None:
    assert noether_wrap.__all__ == sorted(noether_wrap.__all__)
    assert set(noether_wrap.__all__) == {
        "Affine",
        "ConservedFit",
        "Diagnosis",
        "NoetherWrapper",
        "Rollout",
        "TailorOutput",
        "TailoringDoesNotHelp",
        "TuneConfig",
        "TuneGridResult",
        "TuneResult",
        "TuningWarning",
        "__version__",
        "conservation_loss",
        "denoise_with_labels",
        "diagnose",
        "drift_loss",
        "embeddings",
        "fit_conserved",
        "noether_loss",
        "tune",
        "tune_cv",
        "tune_inner_lr",
        "validation",
    }
    assert embeddings.__all__ == ["ConvEmbedding", "FeatureLibrary", "MLPEmbedding", "Standardized"]


def test_version() -> None:
    assert noether_wrap.__version__ == "0.1.0"
