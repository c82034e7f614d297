"""MLflow "models from code" entry: the file MLflow stores with each run's pyfunc model."""

import mlflow

from mner_bench.serving import MnerPyfuncModel

mlflow.models.set_model(MnerPyfuncModel())
