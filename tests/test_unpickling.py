"""No loader of checkpoint files runs code from them: a .pt / .bin file whose unpickling would create a file
is refused, and the file is never created."""
import pytest
import torch

from GPT_Trainer import checkpoint, modeling


class CreatesAFile:
    """Unpickling this calls open(path, "w"): the file appearing proves that code from the pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture
def payload(tmp_path):
    """(write(file): save a checkpoint-like dict holding the payload, marker: the file it would create)."""
    marker = tmp_path / "code_ran"

    def write(file):
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": CreatesAFile(marker), "step": 3}, file)
        return file

    return write, marker


def test_the_payload_is_live_for_an_unsafe_load(tmp_path, payload):
    """The control: torch.load without weights_only does run it, so the tests below prove something."""
    write, marker = payload
    torch.load(write(tmp_path / "x.pt"), weights_only=False).get("state").close()
    assert marker.exists()


@pytest.mark.parametrize("load,file", [
    (modeling.load_plain, "optimizer.pt"),
    (modeling.load_state_dict_file, "pytorch_model.bin"),
    (lambda path: modeling.load_training_config(path.removesuffix("config.pt")), "config.pt"),
])
def test_loaders_refuse_it(tmp_path, payload, load, file):
    write, marker = payload
    path = write(tmp_path / "run" / file)
    with pytest.raises(ValueError, match="only tensors and plain values"):
        load(str(path))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:resuming from")  # the other files of a full checkpoint are absent here
def test_resuming_refuses_it_in_the_optimizer_and_the_training_state(tmp_path, payload):
    write, marker = payload
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    run_dir = tmp_path / "run"
    write(run_dir / checkpoint.OPTIMIZER_FILE)
    with pytest.warns(UserWarning, match="optimizer.pt cannot be used"):
        checkpoint.restore_training_state(str(run_dir), optimizer, scheduler)
    write(run_dir / checkpoint.STATE_FILE)
    with pytest.raises(ValueError, match="only tensors and plain values"):
        checkpoint.restore_training_state(str(run_dir), optimizer, scheduler)
    assert not marker.exists()
