"""Sequence classification (`task: classification`): a classification head on the model, with a LoRA adapter
(peft trains and saves the head too), on labelled texts. Accuracy, precision, recall and F1 (macro and per
class) on the validation rows are logged at each evaluation and measured before and after training."""

from __future__ import annotations

from ayar.errors import DataError
from ayar.metrics.scores import classification as classification_metrics
from ayar.models.adapters import apply_method
from ayar.training.trl_stage import Stage


def labels_of(cfg, splits) -> list[str]:
    labels = sorted({r.label for r in splits.train})
    if len(labels) < 2:
        raise DataError(f"classification needs at least two labels in the training rows; found {labels}")
    for r in splits.val:
        if r.label not in labels:
            raise DataError(f"{r.where}: label {r.label!r} does not occur in the training rows ({', '.join(labels)})")
    return labels


def model_kwargs(cfg, splits) -> dict:
    labels = labels_of(cfg, splits)
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {l: i for i, l in enumerate(labels)},
    }


def metrics_fn(labels: list[str]):
    def compute(pred) -> dict:
        predicted = [labels[i] for i in pred.predictions.argmax(-1)]
        gold = [labels[i] for i in pred.label_ids]
        m = classification_metrics(predicted, gold)
        flat = {k: m[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")}
        flat.update({f"f1_{c}": v["f1"] for c, v in m["per_class"].items()})
        return flat

    return compute


def build(cfg, model, tok, splits, args: dict, callbacks):
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    labels = labels_of(cfg, splits)
    index = {l: i for i, l in enumerate(labels)}

    def data(recs):
        if not recs:
            return None
        enc = tok([r.text for r in recs], truncation=True, max_length=cfg.data.max_length)
        return Dataset.from_dict({**enc, "labels": [index[r.label] for r in recs]})

    model = apply_method(model, cfg.method, cfg.lora, task_type="SEQ_CLS")  # peft also trains and saves the head
    val = data(splits.val)
    return Trainer(
        model,
        args=TrainingArguments(**{**args, **({} if val else {"eval_strategy": "no"})}),
        train_dataset=data(splits.train),
        eval_dataset=val,
        processing_class=tok,
        data_collator=DataCollatorWithPadding(tok),
        compute_metrics=metrics_fn(labels),
        callbacks=callbacks,
    )


def held_out(cfg, trainer, splits) -> dict:
    if trainer.eval_dataset is None:
        return {}
    m = trainer.evaluate()
    return {
        k.removeprefix("eval_"): v
        for k, v in m.items()
        if k.removeprefix("eval_") in ("accuracy", "precision_macro", "recall_macro", "f1_macro")
        or k.startswith("eval_f1_")
    }


STAGE = Stage(
    name="classification",
    kinds=("classification",),
    build=build,
    auto_class="AutoModelForSequenceClassification",
    model_kwargs=model_kwargs,
    before=held_out,
    after=held_out,
)
