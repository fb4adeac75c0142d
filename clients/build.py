"""Generate and build the Go and Java clients from protos/, with Debian's toolchains.

    python clients/build.py go      # -> build/clients/go-<hash>/bin/labelgrid-client
    python clients/build.py java    # -> build/clients/java-<hash>/classes (+ classpath.txt)

Each build lands in a folder named after a hash of everything that goes into it (the .proto
files, the client's sources, the tool versions), so an unchanged client is not rebuilt; Go's
build cache (build/clients/go-cache) makes a changed one cheap. The last line printed is a JSON
object with what to run: {"argv": [...]} (argv prefix of the client program).

Toolchains (Debian bookworm; `make install-go install-java` installs them):
- Go: golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev
  golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev. go 1.19 with grpc-go 1.33
  from /usr/share/gocode, built in GOPATH mode (GO111MODULE=off, GOPROXY=off: nothing fetched).
- Java: libgrpc-java protobuf-compiler-grpc-java-plugin libprotobuf-java libnetty-java
  libperfmark-java libgoogle-gson-java libgeronimo-annotation-1.3-spec-java and a JDK (javac);
  protoc with /usr/bin/grpc_java_plugin, javac with the jars of /usr/share/java.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
THIRD_PARTY = PROTO_ROOT / "third_party"  # google/api's resource and field_behavior annotations
BUILD = REPO / "build" / "clients"
WKT = Path("/usr/include")  # google/protobuf/*.proto of Debian's protobuf, matching its protoc
GO_CLIENT = REPO / "clients" / "go" / "labelgrid-client"
JAVA_SOURCES = REPO / "clients" / "java" / "src"
JAVA_JARS = [
    "grpc-api", "grpc-core", "grpc-context", "grpc-netty", "grpc-protobuf", "grpc-protobuf-lite", "grpc-stub",
    "protobuf", "guava", "netty-buffer", "netty-codec", "netty-codec-http", "netty-codec-http2", "netty-common",
    "netty-handler", "netty-resolver", "netty-transport", "perfmark-api", "gson",
    "geronimo-annotation-1.3-spec",  # @javax.annotation.Generated, gone from the JDK since Java 11
]  # fmt: skip


class ToolchainMissing(RuntimeError):
    """A compiler, plugin or library is not installed."""


def protos() -> list[Path]:
    """The contracts and the annotations they import; both are compiled, so a client needs no
    googleapis package of its own (Go: google.golang.org/genproto/googleapis/api/annotations,
    Java: com.google.api, generated here)."""
    return sorted((PROTO_ROOT / "labelgrid").rglob("*.proto")) + sorted(THIRD_PARTY.rglob("*.proto"))


def virtual(path: Path) -> str:
    """The import path protoc knows a .proto file by."""
    return str(path.relative_to(THIRD_PARTY if path.is_relative_to(THIRD_PARTY) else PROTO_ROOT))


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolchainMissing(f"`{name}` is not installed (run `make install-go install-java`)")
    return path


def version(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (result.stdout + result.stderr).strip()


def key(files: list[Path], versions: list[str]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    for value in versions:
        digest.update(value.encode() + b"\0")
    return digest.hexdigest()[:16]


def run(argv: list[str], **kwargs: object) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed ({result.returncode}):\n{result.stdout}{result.stderr}")


def protoc(out_flags: list[str]) -> None:
    run([tool("protoc"), f"-I{PROTO_ROOT}", f"-I{THIRD_PARTY}", f"-I{WKT}", *out_flags, *map(virtual, protos())],
        cwd=PROTO_ROOT)  # fmt: skip


def fresh_folder(name: str) -> tuple[Path, Path | None]:
    """(final folder, temp folder to build in, or None when the final one is complete)."""
    final = BUILD / name
    if (final / ".complete").is_file():
        return final, None
    BUILD.mkdir(parents=True, exist_ok=True)
    return final, Path(tempfile.mkdtemp(prefix=f".{name}.", dir=BUILD))


def finish(tmp: Path, final: Path, prefix: str) -> None:
    (tmp / ".complete").touch()
    for old in BUILD.glob(f"{prefix}-*"):  # older builds of this client
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:  # a concurrent build finished first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)


def build_go() -> list[str]:
    go = tool("go")
    for plugin in ("protoc", "protoc-gen-go", "protoc-gen-go-grpc"):
        tool(plugin)
    if not Path("/usr/share/gocode/src/google.golang.org/grpc").is_dir():
        raise ToolchainMissing("grpc-go is not installed: apt-get install golang-google-grpc-dev (`make install-go`)")
    sources = sorted(GO_CLIENT.glob("*.go"))
    versions = [version(go, "version"), version("protoc", "--version"), version("protoc-gen-go", "--version"),
                version("protoc-gen-go-grpc", "--version")]  # fmt: skip
    final, tmp = fresh_folder(f"go-{key(protos() + sources, versions)}")
    if tmp is not None:
        gopath = tmp / "gopath" / "src"
        gopath.mkdir(parents=True)
        protoc([f"--go_out={gopath}", f"--go-grpc_out={gopath}"])
        env = {
            **os.environ,
            "GOPATH": f"{tmp / 'gopath'}{os.pathsep}/usr/share/gocode",
            "GO111MODULE": "off",
            "GOPROXY": "off",
            "GOFLAGS": "",
            "GOCACHE": str(BUILD / "go-cache"),
        }
        (tmp / "bin").mkdir()
        run([go, "build", "-o", str(tmp / "bin" / "labelgrid-client"), *map(str, sources)], env=env, cwd=REPO)
        finish(tmp, final, "go")
    return [str(final / "bin" / "labelgrid-client")]


def build_java() -> list[str]:
    javac, java = tool("javac"), tool("java")
    plugin = Path("/usr/bin/grpc_java_plugin")
    if not plugin.is_file():
        raise ToolchainMissing("grpc_java_plugin is missing: apt-get install protobuf-compiler-grpc-java-plugin")
    jars = [Path(f"/usr/share/java/{name}.jar") for name in JAVA_JARS]
    missing = [str(jar) for jar in jars if not jar.is_file()]
    if missing:
        raise ToolchainMissing(f"jars missing (run `make install-java`): {', '.join(missing)}")
    sources = sorted(JAVA_SOURCES.rglob("*.java"))
    versions = [version(javac, "-version"), version("protoc", "--version"), *(str(j.resolve()) for j in jars)]
    final, tmp = fresh_folder(f"java-{key(protos() + sources, versions)}")
    classpath = os.pathsep.join(map(str, jars))
    if tmp is not None:
        gen = tmp / "gen"
        gen.mkdir()
        protoc([f"--java_out={gen}", f"--plugin=protoc-gen-grpc-java={plugin}", f"--grpc-java_out={gen}"])
        all_sources = [*map(str, sorted(gen.rglob("*.java"))), *map(str, sources)]
        argfile = tmp / "sources.txt"
        argfile.write_text("\n".join(all_sources))
        run([javac, "-nowarn", "-encoding", "UTF-8", "-d", str(tmp / "classes"), "-cp", classpath, f"@{argfile}"])
        (tmp / "classpath.txt").write_text(f"{final / 'classes'}{os.pathsep}{classpath}\n")
        finish(tmp, final, "java")
    return [java, "-cp", f"{final / 'classes'}{os.pathsep}{classpath}", "io.labelgrid.example.LabelgridClient"]


def main() -> None:
    builders = {"go": build_go, "java": build_java}
    if len(sys.argv) != 2 or sys.argv[1] not in builders:
        sys.exit(f"usage: {sys.argv[0]} {'|'.join(builders)}")
    try:
        argv = builders[sys.argv[1]]()
    except ToolchainMissing as err:
        sys.exit(f"build.py: {err}")
    print(json.dumps({"argv": argv}))


if __name__ == "__main__":
    main()
