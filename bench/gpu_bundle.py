"""What ``make gpu-smoke`` needs on a GPU machine without network, gathered here: ``make gpu-bundle``.

The GPU machine this is sized for (issue 13; /work/.library/device) has Python 3.12 with torch
(CUDA), transformers, numpy, scipy, Pillow, safetensors, huggingface-hub, accelerate, einops,
psutil, rich, prometheus-client, imageio, opencv and werkzeug, but not diffusers, fastvideo,
celery, PyAV, pydantic, the minio SDK, moto or a redis-server. This downloads exactly those, as
wheels for that Python (``--no-deps``: ``PACKAGES`` names every one), plus Debian's redis-server
and the three libraries it links that such a machine may lack, into ``.gpu-bundle/``, and checks
that the bundle and the project's tracked files together stay under 64 MiB (what a device call
carries). ``scripts/gpu-smoke.sh`` installs it there with ``pip --no-index`` and runs the smoke.

Two wheels are pruned (under their own names: pip checks a name against the metadata): botocore
keeps the API models of the services moto's S3 endpoint loads (17 MB -> 1.2 MB), moto keeps its
core and those services (7 MB -> ~1 MB). Left out for want of room: ray (79 MB; FastVideo's Ray
executor, whose row then reports "not run"). imageio-ffmpeg (68 MB) is not needed: FastVideo's
MP4s are written by the farm's own PyAV encoder (``tasks.engines.fastvideo_mp4``).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 64 * 2**20
# Each package the smoke imports that the GPU machine lacks, pinned to what the test suite runs.
PACKAGES = [
    # the queue
    "celery==5.7.0", "kombu==5.7.0", "billiard==4.3.2", "vine==5.1.0", "amqp==5.4.2", "redis==8.1.0",
    "click-didyoumean==0.3.1", "click-plugins==1.1.1.2", "click-repl==0.4.1", "prompt_toolkit==3.0.53",
    "wcwidth==0.9.4", "tzdata==2026.6", "tzlocal==5.4.5",
    # settings and validation
    "pydantic==2.14.4", "pydantic_core==2.50.5", "pydantic-settings==2.16.3", "python-dotenv==1.2.4",
    "annotated-types==0.8.0", "typing-inspection==0.4.5",
    # storage: the minio SDK, and moto's S3 endpoint standing in for MinIO
    "minio==7.2.20", "pycryptodome==4.4.0", "argon2-cffi==25.1.0", "argon2-cffi-bindings==26.2.0",
    "cffi==2.1.1", "pycparser==3.12", "moto==5.2.5", "boto3==1.44.8", "botocore==1.44.8", "s3transfer==0.19.3",
    "jmespath==1.1.0", "xmltodict==1.0.4", "responses==0.26.3", "flask==3.1.3", "flask-cors==6.0.5",
    "blinker==1.9.0", "itsdangerous==2.2.0", "cryptography==50.0.2", "py-partiql-parser==0.6.3",
    # the engines and the MP4
    "av==18.1.0", "diffusers==0.42.1", "fastvideo==0.2.1", "ftfy==6.3.1", "remote-pdb==2.1.0",
]  # fmt: skip
# Debian packages: redis-server (the binary is in redis-tools, the name in redis-server) and the
# libraries it links that are not glibc's, OpenSSL's or systemd's.
DEBS = ["redis-server", "redis-tools", "liblzf1", "libjemalloc2", "libatomic1"]
# What the pruned wheels keep (prefixes of paths inside the wheel); the rest of their payload goes.
KEEP = {
    "botocore": ("botocore/data/s3/", "botocore/data/sts/", "botocore/data/iam/", "botocore/data/events/",
                 "botocore/data/monitoring/", "botocore/data/kms/", "botocore/data/s3control/"),
    "moto": ("moto/core/", "moto/utilities/", "moto/moto_api/", "moto/moto_server/", "moto/s3/",
             "moto/s3bucket_path/", "moto/s3control/", "moto/sts/", "moto/iam/", "moto/events/",
             "moto/cloudwatch/", "moto/kms/"),
}  # fmt: skip
PRUNED_FROM = {"botocore": "botocore/data/", "moto": "moto/"}  # a subfolder here is dropped unless kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpu-bundle")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    args = parser.parse_args(argv)
    wheels, debs = args.dest / "wheels", args.dest / "debs"
    shutil.rmtree(args.dest, ignore_errors=True)
    wheels.mkdir(parents=True)
    debs.mkdir()
    download_wheels(wheels, args.python_version)
    for name in PRUNED_FROM:
        prune(next(wheels.glob(f"{name}-*.whl")), name)
    subprocess.run(["apt-get", "download", *DEBS], cwd=debs, check=True, capture_output=True)
    return report(args.dest)


def download_wheels(dest: Path, python_version: str) -> None:
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34)] + ["manylinux2014_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "--dest", str(dest)]  # fmt: skip
    for platform in platforms:
        command += ["--platform", platform]
    subprocess.run([*command, *PACKAGES], check=True)


def prune(wheel: Path, name: str) -> Path:
    """Rewrite ``wheel`` without the parts of ``name`` that ``KEEP`` does not list; RECORD follows."""
    under = PRUNED_FROM[name]

    def kept(path: str) -> bool:
        if not path.startswith(under) or "/" not in path[len(under) :]:
            return True  # outside the pruned folder, or a file directly in it
        return path.startswith(KEEP[name])

    pruned = wheel.with_suffix(".pruning")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(pruned, "w", zipfile.ZIP_DEFLATED) as out:
        for item in src.infolist():
            if not kept(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if kept(line.split(",", 1)[0])) + "\n").encode()
            out.writestr(item, data)
    return pruned.replace(wheel)


def tracked_bytes() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def report(dest: Path) -> int:
    items = sorted(p for p in dest.rglob("*") if p.is_file())
    for path in sorted(items, key=lambda p: -p.stat().st_size)[:8]:
        print(f"{path.stat().st_size / 1e6:8.2f} MB  {path.relative_to(dest)}")
    bundle, source = sum(p.stat().st_size for p in items), tracked_bytes()
    total = bundle + source
    print(f"bundle {bundle / 2**20:.1f} MiB ({len(items)} files) + tracked source {source / 2**20:.1f} MiB = "
          f"{total / 2**20:.1f} MiB of {LIMIT / 2**20:.0f} MiB")  # fmt: skip
    if total > LIMIT:
        print("too big for one device call: drop a package or prune further", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
