"""The application: run configs, model and data builders, the runner behind `lora-ensemble fit / evaluate /
predict / compare / demo / benchmark`, tables and plots. Built on the library and the training routine."""

from lora_ensemble.extras import require

require("train", "lightning", "torchmetrics", "numpy", "yaml", "matplotlib", feature="the command line (lora_ensemble.app)")
