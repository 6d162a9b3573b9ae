import noether_wrap
from noether_wrap import embeddings


def test_public_names_are_pinned() -> None:
    assert noether_wrap.__all__ == sorted(noether_wrap.__all__)
    assert set(noether_wrap.__all__) == {
        "NoetherWrapper",
        "Rollout",
        "TailorOutput",
        "__version__",
        "embeddings",
        "noether_loss",
    }
    assert embeddings.__all__ == ["ConvEmbedding", "FeatureLibrary", "MLPEmbedding"]


def test_version() -> None:
    assert noether_wrap.__version__ == "0.1.0"
