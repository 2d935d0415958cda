"""normkit where teams already train: ``normkit.integrations.hf.NormkitCallback`` (a Hugging Face
``Trainer`` callback).  The MLflow exporter is ``normkit.monitor.MlflowExporter``.

Importing this package imports nothing; each integration's module imports its framework and
raises an ImportError naming the extra to install when it is missing.
"""
