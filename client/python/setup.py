"""Builds the paramd package, generating its gRPC stubs from the proto.

The stubs are not checked in: every build runs grpcio-tools on
`proto/proto/paramd/v1/paramd.proto` of the repository (or on the copy an
sdist carries), so they can never drift from the protocol the server speaks.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join("paramd", "v1", "paramd.proto")
# The sdist's copy first, then the repository's proto crate.
PROTO_ROOTS = [
    os.path.join(HERE, "proto"),
    os.path.join(HERE, "..", "..", "proto", "proto"),
]


def proto_root():
    for root in PROTO_ROOTS:
        if os.path.isfile(os.path.join(root, PROTO)):
            return os.path.normpath(root)
    raise RuntimeError(
        "cannot find %s under any of %s: build paramd from the repository "
        "(pip install ./client/python) or from its sdist" % (PROTO, PROTO_ROOTS)
    )


def generate(out_dir):
    """Writes paramd/v1/paramd_pb2{,_grpc}.py{,i} under `out_dir`."""
    from grpc_tools import protoc

    import grpc_tools

    root = proto_root()
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    os.makedirs(os.path.join(out_dir, "paramd", "v1"), exist_ok=True)
    args = [
        "grpc_tools.protoc",
        "-I" + root,
        "-I" + include,
        "--python_out=" + out_dir,
        "--pyi_out=" + out_dir,
        "--grpc_python_out=" + out_dir,
        PROTO,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("grpc_tools.protoc failed on %s" % os.path.join(root, PROTO))


class BuildPyWithStubs(build_py):
    def run(self):
        super().run()
        generate(self.build_lib)


class SdistWithProto(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        dst = os.path.join(base_dir, "proto", PROTO)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(proto_root(), PROTO), dst)


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProto})
