"""Where users train: TensorBoard export (:mod:`hessdiag.integrations.tensorboard`), a
PyTorch Lightning callback (:mod:`hessdiag.integrations.lightning`) and a Hugging Face
``Trainer`` callback (:mod:`hessdiag.integrations.transformers`). Each imports its
framework only when it is imported itself; all measure with
:class:`hessdiag.monitor.SharpnessMonitor`."""
