"""ImageNet (ILSVRC2012) as downloaded: the flat validation folder and its ground truth, the devkit's
synset mapping, and the per-class training tars.

Validation labels come from either form of the ground truth (docs/imagenet.md):
  - the devkit (ILSVRC2012_devkit_t12/, extracted or as its .tar.gz): data/ILSVRC2012_validation_ground_truth.txt
    gives an ILSVRC2012_ID per line (line i: ILSVRC2012_val_<i, 8 digits>), data/meta.mat maps IDs to wnids;
  - LOC_val_solution.csv: `ImageId,PredictionString`, the wnid being the string's first word.
Class indices are the sorted wnids (the train/ folder names); when the devkit is found, its 1000 leaf
wnids must be exactly those folders. Every mismatch is one line naming the entry.

The training tars are not read directly: `python -m pipelines.imagenet_layout extract-train PATH`
extracts them once (PATH: ILSVRC2012_img_train.tar or a folder of its per-class tars).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import struct
import sys
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LOC_CSV = "LOC_val_solution.csv"
DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META = "meta.mat"
EXTRACT = "python -m pipelines.imagenet_layout extract-train"


@dataclass
class Devkit:
    source: Path
    wnids: dict[int, str]  # ILSVRC2012_ID -> wnid of every leaf class
    ground_truth: bytes | None  # the ground-truth file's text, when present


# --- finding and reading the ground truth ---------------------------------------------------------

def find_labels(root: Path, given: str | None) -> Path | None:
    """The ground truth to use: `given`, else the devkit or LOC_val_solution.csv in the dataset folder,
    its val/ or up to three folders above (the Kaggle layout keeps the csv beside ILSVRC/)."""
    if given:
        path = Path(given).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"validation labels {path} do not exist")
        return path
    for folder in (root, root / "val", *list(root.parents)[:3]):
        for name in (DEVKIT, DEVKIT + ".tar.gz", LOC_CSV):
            if (folder / name).exists():
                return folder / name
    return None


def read_devkit(path: Path) -> Devkit:
    """The devkit as a folder, its .tar.gz, its data/ folder, or the ground-truth file beside meta.mat."""
    files: dict[str, bytes] = {}
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.isfile() and Path(m.name).name in (GROUND_TRUTH, META):
                    files[Path(m.name).name] = tar.extractfile(m).read()
    else:
        folder = path.parent if path.is_file() else path
        for name in (GROUND_TRUTH, META):
            found = next((p for p in (folder / name, folder / "data" / name) if p.is_file()), None)
            if found:
                files[name] = found.read_bytes()
    if META not in files:
        raise FileNotFoundError(f"{path}: no data/{META} (the devkit's synset mapping)")
    try:
        synsets = read_mat_struct(files[META], "synsets")
    except (ValueError, KeyError, struct.error, zlib.error) as e:
        raise ValueError(f"{path}: {META} is not the devkit's synset table ({e})") from None
    wnids = {int(s["ILSVRC2012_ID"]): s["WNID"] for s in synsets if int(s["num_children"]) == 0}
    return Devkit(path, wnids, files.get(GROUND_TRUTH))


def ground_truth_entries(path: Path, devkit: Devkit | None) -> list[tuple[str, str, str]]:
    """(where, image stem, wnid) per entry of the ground truth at `path`; `where` names its line."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{path}: expected the header ImageId,PredictionString")
        out = []
        for line, row in enumerate(rows[1:], start=2):
            words = row[1].split() if len(row) > 1 else []
            if not words:
                raise ValueError(f"{path} line {line}: no wnid for {row[0] if row else 'an empty row'}")
            out.append((f"{path} line {line}", row[0].strip(), words[0]))
        return out
    if devkit is None or devkit.ground_truth is None:
        raise FileNotFoundError(f"{path}: no {GROUND_TRUTH} (give the devkit or {LOC_CSV})")
    out = []
    for line, text in enumerate(devkit.ground_truth.decode().split(), start=1):
        where = f"{devkit.source} ({GROUND_TRUTH}) line {line}"
        if not text.isdigit() or int(text) not in devkit.wnids:
            raise ValueError(f"{where}: unknown ILSVRC2012_ID {text!r} (not a class of {META})")
        out.append((where, f"ILSVRC2012_val_{line:08d}", devkit.wnids[int(text)]))
    return out


def flat_val_samples(val_dir: Path, classes: list[str], labels: Path) -> list[tuple[str, int]]:
    """(path, class index) of every file of a flat val/ folder, sorted by file name."""
    files = {Path(e.name).stem: e.path for e in os.scandir(val_dir) if e.is_file() and not e.name.startswith(".")}
    devkit = None if labels.suffix == ".csv" else read_devkit(labels)
    index = {wnid: i for i, wnid in enumerate(classes)}
    samples: dict[str, tuple[str, int]] = {}
    for where, stem, wnid in ground_truth_entries(labels, devkit):
        if wnid not in index:
            raise ValueError(f"{where}: unknown wnid {wnid} for {stem} (no such class folder in train/)")
        if stem not in files:
            raise ValueError(f"{where}: {stem} is not a file in {val_dir}")
        if stem in samples:
            raise ValueError(f"{where}: {stem} is listed twice")
        samples[stem] = (files[stem], index[wnid])
    unlabelled = sorted(set(files) - set(samples))
    if unlabelled:
        raise ValueError(f"{files[unlabelled[0]]} has no ground truth in {labels} "
                         f"({len(unlabelled)} such file(s))")
    return [samples[stem] for stem in sorted(samples)]


def check_class_order(classes: list[str], devkit: Devkit) -> None:
    """The class indices (sorted train/ folder names) must be the devkit's leaf wnids, sorted."""
    expected = sorted(devkit.wnids.values())
    if classes != expected:
        extra = sorted(set(classes) - set(expected))
        missing = sorted(set(expected) - set(classes))
        raise ValueError(f"train/ class folders differ from the {len(expected)} classes of {devkit.source}: "
                         f"{len(extra)} unknown (e.g. {extra[:3]}), {len(missing)} missing (e.g. {missing[:3]})")


def train_tars_left(train_dir: Path) -> list[str]:
    """Per-class tars in train/ that have no extracted folder beside them."""
    return sorted(e.name for e in os.scandir(train_dir)
                  if e.is_file() and e.name.endswith(".tar") and not (train_dir / e.name[:-4]).is_dir())


# --- MATLAB 5 files: just enough to read the devkit's struct array --------------------------------

_NUMERIC = {1: "b", 2: "B", 3: "h", 4: "H", 5: "i", 6: "I", 7: "f", 9: "d", 12: "q", 13: "Q"}
_MATRIX, _COMPRESSED, _UTF8 = 14, 15, 16
_CELL, _STRUCT, _CHAR = 1, 2, 4


def read_mat_struct(data: bytes, name: str) -> list[dict]:
    """The struct array `name` of a little-endian MATLAB 5 file as dicts (numbers as floats, chars as
    str, empty fields as None)."""
    if data[126:128] != b"IM":
        raise ValueError("not a little-endian MATLAB 5 file")
    pos = 128
    while pos < len(data):
        kind, body, pos = _element(data, pos)
        if kind == _COMPRESSED:
            kind, body, _ = _element(zlib.decompress(body), 0)
        if kind == _MATRIX:
            var, value = _matrix(body)
            if var == name:
                return value
    raise KeyError(f"no variable {name!r}")


def _element(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(type, payload, next position) of the data element at `pos` (small or normal format)."""
    kind, size = struct.unpack_from("<II", data, pos)
    if kind >> 16:  # small element: the size in the upper half, the payload in the next 4 bytes
        return kind & 0xFFFF, data[pos + 4:pos + 4 + (kind >> 16)], pos + 8
    end = pos + 8 + size
    return kind, data[pos + 8:end], end if kind == _COMPRESSED else end + (-size % 8)


def _numbers(kind: int, body: bytes) -> list:
    if kind == _UTF8:
        return list(body.decode())
    code = _NUMERIC[kind]
    return list(struct.unpack(f"<{len(body) // struct.calcsize(code)}{code}", body))


def _matrix(body: bytes):
    """(name, value) of a miMATRIX payload: a struct array as a list of dicts, a cell array as a list,
    a char array as str, a numeric array as its first number (every field read here is a scalar)."""
    if not body:
        return "", None
    parts, pos = [], 0
    while pos < len(body):
        kind, payload, pos = _element(body, pos)
        parts.append((kind, payload))
    cls = parts[0][1][0]
    count = 1
    for d in _numbers(*parts[1]):
        count *= d
    name = parts[2][1].decode()
    if cls not in (_CELL, _STRUCT) and len(parts) < 4:
        return name, None
    if cls == _CHAR:
        return name, "".join(c if isinstance(c, str) else chr(c) for c in _numbers(*parts[3]))
    if cls == _CELL:
        return name, [_matrix(p)[1] for _, p in parts[3:]]
    if cls == _STRUCT:
        width = _numbers(*parts[3])[0]
        raw = parts[4][1]
        fields = [raw[i:i + width].split(b"\0")[0].decode() for i in range(0, len(raw), width)]
        values = [_matrix(p)[1] for _, p in parts[5:]]
        return name, [dict(zip(fields, values[i * len(fields):(i + 1) * len(fields)], strict=True))
                      for i in range(count)]
    numbers = _numbers(*parts[3])
    return name, float(numbers[0]) if numbers else None


# --- extracting the training tars -----------------------------------------------------------------

def extract_train(source: Path, out: Path) -> Iterator[tuple[str, int]]:
    """Extract every per-class tar (from the outer ILSVRC2012_img_train.tar or from a folder of them) into
    out/<wnid>/, yielding (wnid, files) as each class completes; a class whose folder exists is skipped,
    so an interrupted run simply resumes. An unreadable tar, or a source without a single per-class tar,
    is a ValueError naming it."""
    found = 0
    if source.is_dir():
        for tar_path in sorted(source.glob("*.tar")):
            found += 1
            with open(tar_path, "rb") as f:
                yield from _extract_class(tar_path.name, f, out)
    else:
        try:
            with tarfile.open(source, mode="r|") as outer:  # streamed: one pass over 140 GB
                for member in outer:
                    if member.isfile() and member.name.endswith(".tar"):
                        found += 1
                        yield from _extract_class(Path(member.name).name, outer.extractfile(member), out)
        except tarfile.TarError as e:
            raise ValueError(f"not a readable tar ({e})") from None
    if not found:
        raise ValueError("no per-class .tar files in it (give train/ or ILSVRC2012_img_train.tar)")


def _extract_class(tar_name: str, fileobj: io.BufferedIOBase, out: Path) -> Iterator[tuple[str, int]]:
    wnid = tar_name[:-4]
    final = out / wnid
    if final.is_dir():
        return
    partial = out / f".{wnid}.partial"  # renamed when complete: a half-written class never looks done
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    files = 0
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for m in tar:
                if m.isfile():  # plain names only: nothing lands outside the class folder
                    with open(partial / Path(m.name).name, "wb") as f:
                        shutil.copyfileobj(tar.extractfile(m), f)
                    files += 1
    except tarfile.TarError as e:  # name the broken class tar, not just the source
        raise ValueError(f"{tar_name} is not a readable tar ({e})") from None
    os.replace(partial, final)
    yield wnid, files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.imagenet_layout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract-train", help="extract the per-class training tars into class folders")
    ex.add_argument("source", help="ILSVRC2012_img_train.tar, or a folder holding its per-class tars")
    ex.add_argument("--out", help="train/ folder to fill (default: the folder of tars itself, or train/ beside "
                    "the outer tar)")
    args = parser.parse_args(argv)
    source = Path(args.source).expanduser()
    if not source.exists():
        print(f"error: {source} does not exist", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent / "train")
    done = 0
    try:
        for wnid, files in extract_train(source, out):  # a line per class: ImageNet's 1000 take a while
            done += 1
            print(f"[{done}] {wnid}: {files} files", flush=True)
    except (OSError, ValueError) as e:
        print(f"error: {source}: {e}", file=sys.stderr)
        return 2
    print(f"extracted {done} class(es) into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
