"""Fuzzing the two parsers of untrusted files: the YAML config loaders and the ``.etz`` reader.

- configs: the real files in ``configs/`` (pipelines, clusters, specs), mutated as trees (keys
  deleted, values replaced by random YAML values or swapped with values of other types, unknown
  keys inserted) and as text (slices cut, nasty snippets spliced in), and random bytes or text as a
  whole file. Every input gives a config or a ``ConfigError``, never another exception.
- artifacts: a real exported model, truncated, bit-flipped, spliced with random bytes, with huge
  claimed lengths, and with a mutated JSON header or payload inside a valid frame and CRC. Every
  input loads (as well-formed tensors) or raises the reader's one error type, ``ValueError``
  (one line naming the file); never a crash of another type, never a large allocation.

Every example runs under a wall-clock alarm; examples are derandomized so CI is reproducible.
"""
from __future__ import annotations

import copy
import json
import resource
import signal
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastictrain import artifact, checkpoint
from elastictrain.artifact.format import CRC, HEAD, MAX_META
from elastictrain.compress import compress_state_dict
from elastictrain.config import ConfigError
from elastictrain.constraints.spec import Spec, parse
from elastictrain.constraints.spec import load as load_spec
from elastictrain.models import build_model
from jobs.cluster import ClusterConfig, load_cluster
from pipeline.config import PipelineConfig, load_pipeline

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 10  # per example: far above any real parse (milliseconds), far below a hang
FUZZ = settings(max_examples=400, derandomize=True, deadline=5000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(Exception):
    pass


@contextmanager
def alarm(seconds: float = SECONDS):
    def ring(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- configs --------------------------------------------------------------------------------------

def _seed(path: Path):
    tree = yaml.safe_load(path.read_text())
    for stage in tree.get("stages", []):  # spec paths made absolute: the mutants are written elsewhere
        if isinstance(stage.get("spec"), str):
            stage["spec"] = str((path.parent / stage["spec"]).resolve())
    return tree


KINDS = {"pipeline": (sorted((ROOT / "configs/experiments").glob("*.yaml")), load_pipeline, PipelineConfig),
         "cluster": (sorted((ROOT / "configs/clusters").glob("*.yaml")), load_cluster, ClusterConfig),
         "spec": (sorted((ROOT / "configs/specs").glob("*.yaml")), load_spec, Spec)}
SEEDS = {kind: [_seed(p) for p in paths] for kind, (paths, _, _) in KINDS.items()}


def _keys(tree) -> set[str]:
    if isinstance(tree, dict):
        return set(map(str, tree)) | set().union(*(_keys(v) for v in tree.values()))
    if isinstance(tree, list):
        return set().union(*(_keys(v) for v in tree)) if tree else set()
    return set()


KNOWN_KEYS = sorted(set().union(*(_keys(t) for seeds in SEEDS.values() for t in seeds)))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.integers(), st.integers(-2**80, 2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["", "*", "each", "any", "kernel", "filter", "2:4", "5:4", "0:0", "2:", "cuda", "local", "slurm",
                     "ray", "auto", "fp16", "progressive", "admm", "00:00:00", "99:99:99", "1-00", "../nope.yaml",
                     "features.*.weight", "smallcnn", "vgg16", "fashion-mnist", "imagefolder", "/", "\x00"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=6), inner, max_size=4),
                      max_leaves=12)


def _nodes(tree, at=()):
    yield at
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        yield from _nodes(v, at + (k,))


def _get(tree, at):
    for k in at:
        tree = tree[k]
    return tree


def mutate(draw, tree):
    """1–4 tree edits: delete, replace, insert an unknown or known key, swap two values."""
    tree = copy.deepcopy(tree)
    for _ in range(draw(st.integers(1, 4))):
        nodes = list(_nodes(tree))
        at = draw(st.sampled_from(nodes))
        op = draw(st.sampled_from(["delete", "replace", "insert", "swap"]))
        if not at:
            if op == "replace":
                tree = draw(VALUES)
            continue
        parent, key = _get(tree, at[:-1]), at[-1]
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = draw(VALUES)
        elif op == "insert":
            node = _get(tree, at)
            if isinstance(node, dict):
                node[draw(st.sampled_from(KNOWN_KEYS) | st.text(min_size=1, max_size=8))] = draw(VALUES)
            elif isinstance(node, list):
                node.insert(draw(st.integers(0, len(node))), draw(VALUES))
        else:
            other = draw(st.sampled_from(nodes))
            if other and other[:len(at)] != at and at[:len(other)] != other:  # neither inside the other
                a, b = _get(tree, at), _get(tree, other)
                parent[key], _get(tree, other[:-1])[other[-1]] = b, a
    return tree


SNIPPETS = ["9" * 5000, "-9" * 3000, "&a [*a]", "*undefined", "!!python/object/apply:os.system [id]", "<<: *a",
            "{a: 1, a: 2}", "[" * 3000, "{" * 3000, "- " * 2000, "? [1, 2]\n: 3", "\t", "%YAML 9.9\n---",
            "--- 1\n--- 2", "\ufeff", ": :", "&x {a: *x}", "1e400", ".nan", ".inf", "0x" + "f" * 40, "'unterminated",
            "\x00", "\x85\u2028", "!!binary AAAA", "!!set {a, b}", "!!timestamp 2001-12-14"]


@st.composite
def documents(draw, kind: str) -> bytes:
    """A file's bytes: a mutated real config, a real one's text cut and spliced, or noise."""
    how = draw(st.sampled_from(["tree", "tree", "tree", "text", "noise", "yaml"]))
    seed = draw(st.sampled_from(SEEDS[kind]))
    if how == "tree":
        return yaml.safe_dump(mutate(draw, seed), sort_keys=False, allow_unicode=True).encode()
    if how == "text":
        text = yaml.safe_dump(seed, sort_keys=False)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(text)))
            j = draw(st.integers(i, min(len(text), i + 40)))
            text = text[:i] + draw(st.sampled_from(SNIPPETS) | st.text(max_size=10) | st.just("")) + text[j:]
        return text.encode("utf-8", "surrogatepass")
    if how == "yaml":
        return yaml.safe_dump(draw(VALUES), allow_unicode=True).encode()
    return draw(st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_the_seeds_load():
    """The mutations start from configs that load (so they reach every check, not the first)."""
    for kind, (paths, loader, cls) in KINDS.items():
        assert paths, kind
        for p in paths:
            assert isinstance(loader(p), cls)


@pytest.mark.parametrize("kind", sorted(KINDS))
@FUZZ
@given(data=st.data())
def test_config_loaders_give_a_config_or_a_config_error(scratch, kind, data):
    doc = data.draw(documents(kind))
    path = scratch / f"{kind}.yaml"
    path.write_bytes(doc)
    _, loader, cls = KINDS[kind]
    try:
        with alarm():
            cfg = loader(path)
    except ConfigError as e:
        assert "\n" not in str(e), str(e)[:500]
    else:
        assert isinstance(cfg, cls)


# --- the .etz reader ------------------------------------------------------------------------------

MIXTURE = {"rules": [
    {"match": "features.0.weight", "quantize": {"bits": 2, "groups": {"filter": 8}}},
    {"match": "features.3.weight", "prune": {"unit": "kernel", "ratio": 4}, "pattern": {"entries": 4, "patterns": 8},
     "quantize": {"bits": 2, "groups": {"filter": 16}}},
    {"match": "classifier.0.weight", "prune": {"ratio": 64}, "balance": {"filter": 16, "channel": 4},
     "quantize": {"bits": 3}},
    {"match": "classifier.3.weight", "prune": {"unit": "filter", "ratio": 2}}]}
MAX_BYTES = 64 << 20  # the fuzzed loads' ceiling on declared tensor bytes (the model holds ~3.3 MB)
BOMB = zlib.compress(b" " * (MAX_META + 1), 1)  # metadata that would expand past the reader's limit


@pytest.fixture(scope="module")
def etz(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    sd = build_model("smallcnn", num_classes=10, in_channels=1).state_dict()
    c = compress_state_dict(sd, parse(MIXTURE))
    ck = checkpoint.compressed_checkpoint(c.state_dict, c.states, MIXTURE, epoch=2, extra={"stage": "quantize"})
    path = tmp_path_factory.mktemp("etz") / "m.etz"
    artifact.export(ck, path)
    data = path.read_bytes()
    assert artifact.load(path)["model_state_dict"].keys() == sd.keys()
    return data


@pytest.fixture(scope="module")
def rss_before(etz) -> float:
    return _rss_mb()


def _frame(meta: bytes, payload: bytes) -> bytes:
    body = HEAD.pack(b"\x89ETZ", 1, len(meta), len(payload)) + meta + payload
    return body + CRC.pack(zlib.crc32(body))


def _split(data: bytes) -> tuple[dict, bytes]:
    _, _, h, p = HEAD.unpack_from(data)
    return json.loads(zlib.decompress(data[HEAD.size:HEAD.size + h])), data[HEAD.size + h:HEAD.size + h + p]


ETZ_SCALARS = st.one_of(st.integers(-2, 70), st.integers(-2**70, 2**70), st.integers(1 << 20, 1 << 34),
                        st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=8),
                        st.sampled_from(["float32", "bool", "int64", "bfloat16", "codes", "raw", "all", "none",
                                         "bitmap", "rel", "gaps", "huffman", "packed", "arange", "element", "unit",
                                         "pattern",
                                         "support", "derived", "weight", "unit_any"]))
ETZ_VALUES = st.recursive(ETZ_SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)


@st.composite
def artifacts(draw, data: bytes) -> bytes:
    how = draw(st.sampled_from(["truncate", "flip", "splice", "lengths", "metatext", "meta", "meta", "meta", "payload",
                                "payload"]))
    if how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, len(out) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    if how == "splice":
        i = draw(st.integers(0, len(data)))
        return data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i + draw(st.integers(0, 64)):]
    meta, payload = _split(data)
    if how == "lengths":  # the frame claims other sizes (CRC recomputed, or not)
        h, p = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**64 - 1))
        body = HEAD.pack(b"\x89ETZ", 1, h, p) + data[HEAD.size:-CRC.size]
        return body + CRC.pack(zlib.crc32(body) if draw(st.booleans()) else 0)
    if how == "metatext":  # a valid frame and CRC around other metadata: noise, deep nesting, a zlib bomb
        text = draw(st.binary(max_size=200) | st.sampled_from([b"[" * 100_000, b'{"format": "elastictrain.etz/1"}',
                                                              json.dumps(meta).encode()[:-1], b"1e999999"]))
        return _frame(draw(st.sampled_from([zlib.compress(text), text, BOMB])), payload)
    if how == "meta":  # a valid frame and CRC around a mutated JSON header
        for _ in range(draw(st.integers(1, 3))):
            rec = draw(st.sampled_from(meta["tensors"]))  # a record, then a node in it: names, shapes …
            at = draw(st.sampled_from([a for a in _nodes(rec) if a]))
            parent = _get(rec, at[:-1])
            if isinstance(parent, dict) and draw(st.booleans()):
                del parent[at[-1]]
            else:
                parent[at[-1]] = draw(ETZ_VALUES)
        if draw(st.booleans()):
            meta[draw(st.sampled_from(sorted(meta)))] = draw(ETZ_VALUES)
        return _frame(zlib.compress(json.dumps(meta).encode()), payload)
    out = bytearray(payload)  # a valid frame and CRC around mutated blobs: the decoders' turn
    for _ in range(draw(st.integers(1, 16))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return _frame(zlib.compress(json.dumps(meta).encode()), bytes(out))


def _well_formed(ck: dict) -> None:
    sd = ck["model_state_dict"]
    assert isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items())
    for group in checkpoint.buffers(ck).values():
        assert all(isinstance(v, torch.Tensor) for v in group.values())
    assert sum(v.numel() * v.element_size() for v in sd.values()) <= MAX_BYTES


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@FUZZ
@given(data=st.data())
def test_etz_reader_loads_or_raises_value_error(etz, rss_before, scratch, data):
    blob = data.draw(artifacts(etz))
    path = scratch / "x.etz"
    path.write_bytes(blob)
    try:
        with alarm():
            ck = artifact.load(path, max_bytes=MAX_BYTES)
    except ValueError as e:
        assert type(e) is ValueError and "\n" not in str(e) and str(e).startswith(f"{path}: "), repr(e)[:500]
    else:
        _well_formed(ck)
    # peak memory (a process-wide high-water mark): no header made the reader allocate what it named
    assert _rss_mb() - rss_before < 1024


def test_a_lying_header_is_refused_before_allocating(etz, tmp_path):
    """A weight that claims 2^31 entries, in a valid frame: refused from the header, not after 8 GB."""
    meta, payload = _split(etz)
    weight = next(t for t in meta["tensors"] if t["kind"] == "weight")
    weight["shape"] = [1 << 16, 1 << 15]
    weight["mask"] = {**weight["mask"], "level": "element", "parts": [1 << 16, 1 << 15, 1, 1],
                      "kept": 1 << 31, "pos": {"enc": "all"}}
    path = tmp_path / "liar.etz"
    path.write_bytes(_frame(zlib.compress(json.dumps(meta).encode()), payload))
    before = _rss_mb()
    with pytest.raises(ValueError, match=r"liar.etz: .*bytes of tensors"):
        artifact.load(path)
    assert _rss_mb() - before < 512
