
from adamatch_uan.methods import SourceOnly

from conftest import quiet_trainer, toy_train_batches


def test_learns_from_source_labels_and_ignores_target_images(monkeypatch):
    method = SourceOnly(num_classes=2)
    seen = []
    original = method.model.forward
    monkeypatch.setattr(method.model, "forward", lambda x, c=None: seen.append(len(x)) or original(x, c))
    losses = []
    trainer = quiet_trainer(max_steps=40, callbacks=[LossRecorder(losses)])
    trainer.fit(method, toy_train_batches(40, source=8, target=24))
    assert set(seen) == {8}
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


class LossRecorder(__import__("lightning").Callback):
    def __init__(self, store, key="train/loss_source"):
        self.store, self.key = store, key

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.store.append(float(trainer.callback_metrics[self.key]))
