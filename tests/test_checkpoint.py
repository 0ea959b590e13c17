"""Checkpoints: atomic writes that survive a crash, weights-only loading, clear errors, RNG states."""

import argparse
import os
import pickle

import pytest
import torch
from test_gpu_path import FakeCuda

from dhm_fast import checkpoint
from dhm_fast.errors import UserError, WriteError


def test_round_trip(tmp_path):
    obj = {"model": {"w": torch.randn(3, 4)}, "step": 5, "history": [{"a": 1.5, "b": None}]}
    checkpoint.save_atomic(obj, tmp_path / "last.pt")
    back = checkpoint.load(tmp_path / "last.pt")
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and back["history"] == obj["history"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_a_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(2)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk yanked")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(WriteError, match=f"^cannot write {path}: disk yanked$"):  # one line naming the file
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_crash_before_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"step": 1}, path)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(UserError, match="refusing to load .*evil.pt: it holds Python objects beyond tensors") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)  # one line, no advice to unpickle


@pytest.mark.parametrize("writer", ["pickle-2", "pickle-highest", "torch.save", "torch.save-legacy"])
def test_a_pickle_that_would_run_code_is_refused_in_any_format(tmp_path, writer):
    path = tmp_path / "evil.pt"
    if writer.startswith("pickle"):
        protocol = 2 if writer == "pickle-2" else pickle.HIGHEST_PROTOCOL
        path.write_bytes(pickle.dumps({"model": Evil()}, protocol=protocol))
    else:  # a checkpoint as many trainers write them: an argparse.Namespace beside the weights
        torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path,
                   _use_new_zipfile_serialization=writer == "torch.save")
    with pytest.raises(UserError, match="refusing to load .*evil.pt: it holds Python objects beyond tensors"):
        checkpoint.load(path)


@pytest.mark.parametrize("content", [b"not a checkpoint", b"\xff\xd8\xff\xe0 a JPEG header", bytes(range(256)),
                                     pickle.dumps({"plain": 1}, protocol=0)])
def test_a_file_that_is_no_checkpoint_is_named_so_not_called_unsafe(tmp_path, content):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as e:
        checkpoint.load(path)
    assert str(e.value) == f"checkpoint {path} is not a PyTorch checkpoint (not in torch.save's format)"


def test_any_leading_byte_gives_one_line_not_a_traceback(tmp_path):
    # torch's weights-only unpickler reads any first byte as an opcode: text such as /etc/passwd ("r...",
    # a memo write on an empty stack) raised a bare IndexError, "h..." a KeyError.
    path = tmp_path / "last.pt"
    for first in range(256):
        path.write_bytes(bytes([first]) + b"oot:x:0:0:root:/root:/bin/bash\n")
        with pytest.raises(UserError) as e:
            checkpoint.load(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value), first
    path.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(UserError, match="is not a PyTorch checkpoint"):
        checkpoint.load(path)
    path.write_bytes(pickle.PROTO + b"\x02root:x:0:0")  # starts as torch's legacy pickle does, then breaks
    with pytest.raises(UserError, match=r"is corrupt \(IndexError while reading it\)$"):
        checkpoint.load(path)


def test_an_empty_file_is_named_empty(tmp_path):
    (tmp_path / "last.pt").touch()
    with pytest.raises(UserError, match=f"^checkpoint {tmp_path / 'last.pt'} is empty$"):
        checkpoint.load(tmp_path / "last.pt")


def test_truncated_and_missing_files_get_one_line(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(UserError, match="unreadable or truncated"):
        checkpoint.load(path)
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.pt")


def test_weights_of_another_architecture_are_named():
    from dhm_fast.models import create_model

    model = create_model("resnet20", 10, method="dhm", in_channels=1)
    other = create_model("resnet32", 10, method="dhm", in_channels=1).state_dict()
    with pytest.raises(UserError, match="does not fit a resnet20"):
        checkpoint.load_model_weights(model, other, "ckpt.pt", "resnet20")


def test_rng_state_round_trips(tmp_path):
    checkpoint.save_atomic({"rng": checkpoint.rng_state()}, tmp_path / "r.pt")
    a = torch.rand(3)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "r.pt")["rng"])
    assert torch.equal(torch.rand(3), a)


class FakeCudaRng(FakeCuda):
    """The GPU-path stand-in for torch.cuda, with one generator state per visible device; like the real
    module, asking for a device beyond the visible ones raises IndexError."""

    def __init__(self, monkeypatch, count: int, current: int = 0) -> None:
        super().__init__(monkeypatch, count)
        self.states = {i: torch.full((16,), i + 1, dtype=torch.uint8) for i in range(count)}

        def device(index) -> int:
            index = current if index in (None, "cuda") else torch.device("cuda", index).index
            if index >= count:
                raise IndexError(f"CUDA device {index} of {count}")
            return index

        def set_state(state, device_index="cuda"):
            self.states[device(device_index)] = state.clone()

        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device_index="cuda": self.states[device(device_index)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[i] for i in range(count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                            lambda states: [set_state(s, i) for i, s in enumerate(states)])


def test_each_process_saves_only_its_own_gpus_generator(monkeypatch):
    FakeCudaRng(monkeypatch, count=8, current=3)  # process 3 of 8, every GPU of the node visible
    saved = checkpoint.rng_state()["cuda"]
    assert isinstance(saved, torch.Tensor) and torch.equal(saved, torch.full((16,), 4, dtype=torch.uint8))


@pytest.mark.parametrize("old_format", [False, True], ids=["own-state", "list-of-8"])
def test_a_checkpoint_of_8_visible_gpus_resumes_where_a_process_sees_one(tmp_path, monkeypatch, old_format):
    eight = FakeCudaRng(monkeypatch, count=8, current=0)
    state = checkpoint.rng_state()
    if old_format:  # as written before: every visible GPU's state (get_rng_state_all)
        state["cuda"] = torch.cuda.get_rng_state_all()
    checkpoint.save_atomic({"rng": state}, tmp_path / "last.pt")
    assert len(eight.states) == 8
    one = FakeCudaRng(monkeypatch, count=1)  # requeued with one GPU per task
    one.states[0] = torch.zeros(16, dtype=torch.uint8)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "last.pt")["rng"])
    assert torch.equal(one.states[0], torch.full((16,), 1, dtype=torch.uint8)) and len(one.states) == 1
