"""The MLflow ``pyfunc`` model of a run: input a column ``text`` of raw tweets, output per tweet
``{"text", "tokens", "entities": [{"type", "start", "end", "text"}]}`` (``end`` exclusive).

Logged by the tracking plugin at the end of each run (``tracking.log_model=true``, the default)
as ``runs:/<run id>/model``, with the run's resolved config and best checkpoint as artifacts,
a signature and an input example. Serve it with MLflow's own tooling in an environment where
mner-bench is installed::

    mlflow models serve -m runs:/<run id>/model --env-manager local -p 5001

and ask it ``POST /invocations`` with ``{"dataframe_split": {"columns": ["text"], "data": [["..."]]}}``
(or ``{"inputs": {"text": ["..."]}}``). Param ``pretokenized=true`` takes words separated by
single spaces. For BGA the model is built text-only: the visual encoder is never imported.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow.pyfunc

EXAMPLE = ["RT @user : George Zimmerman visits New York with the Yankees http://t.co/x"]


with warnings.catch_warnings():
    # MLflow nags about ``predict`` type hints when the class is defined; the signature logged
    # with the model states its input and output instead (a ``text`` column of strings).
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")

    class MnerPyfuncModel(mlflow.pyfunc.PythonModel):
        """Loads the run's model with :class:`mner_bench.predict.Predictor` on the CPU (or GPU)."""

        def load_context(self, context):
            from mner_bench.predict import Predictor

            self.predictor = Predictor.from_files(context.artifacts["config"], context.artifacts["weights"], device="auto")

        def predict(self, context, model_input, params=None):
            from mner_bench.predict import entity_spans, tokenize_tweet

            texts = list(model_input["text"]) if hasattr(model_input, "columns") else list(model_input)
            pretokenized = bool((params or {}).get("pretokenized", False))
            words = [t.split(" ") if pretokenized else tokenize_tweet(t) for t in texts]
            tags = self.predictor.tag(words)
            return [{"text": t, "tokens": w, "entities": entity_spans(w, g)} for t, w, g in zip(texts, words, tags, strict=True)]


def log_pyfunc_model(run_id: str, uri: str, config_path: Path, weights_path: Path) -> str:
    """Log the pyfunc model to ``run_id``; returns its model URI ``runs:/<id>/model``."""
    import importlib.metadata as md

    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    model = MnerPyfuncModel()

    class _Ctx:
        artifacts = {"config": str(config_path), "weights": str(weights_path)}

    model.load_context(_Ctx())
    example = pd.DataFrame({"text": EXAMPLE})
    signature = infer_signature(example, model.predict(None, example), params={"pretokenized": False})
    reqs = [f"mner-bench=={md.version('mner-bench')}"] + [
        f"{p}=={md.version(p)}" for p in ("torch", "transformers", "pytorch-crf", "omegaconf", "pluggy", "mlflow")
    ]
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
        mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={"config": str(config_path), "weights": str(weights_path)},
            signature=signature,
            input_example=example,
            pip_requirements=reqs,
        )
    return f"runs:/{run_id}/model"
