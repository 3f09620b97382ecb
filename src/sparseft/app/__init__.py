"""The experiment application: tasks, pretrained loaders, baselines, the runner, sweep, plot
and the ``sparseft`` command. Built on the library (``sparseft``), which imports nothing from here."""
