"""The checked-in message classes are what grpcio-tools makes of the proto
today: regenerated and compared byte for byte."""

import tempfile
from pathlib import Path

import paramd
from fakes import generate

SOURCES = Path(__file__).resolve().parents[1] / "paramd" / "v1"


def test_checked_in_message_classes_match_the_proto():
    with tempfile.TemporaryDirectory() as out:
        generate(Path(out), "python", "pyi")
        for name in ("paramd_pb2.py", "paramd_pb2.pyi"):
            fresh = (Path(out) / "paramd" / "v1" / name).read_text()
            assert (SOURCES / name).read_text() == fresh, (
                "client/python/paramd/v1/%s is stale: regenerate it with grpcio-tools "
                "(see tests/fakes.py: generate)" % name
            )
    # And the installed package carries them.
    assert (Path(paramd.__file__).parent / "v1" / "paramd_pb2.py").is_file()
