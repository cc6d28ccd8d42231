"""Runs: one run model. A run is what is patched (``kinds.Update``: ``adapters.AdapterUpdate``,
``fullmodel.FullUpdate``) x where V comes from (``source.Source``: ``pair_source.PairSource``,
``profile_source.ProfileSource``) x what is written (``kinds.Written``); ``run.py`` prepares,
scores, selects and reports every combination, ``execute.py`` writes. Making a profile
(``profile_run``, ``profile_build``) and inspecting inputs (``inspection``, ``inspect_full``)
are runs too."""
