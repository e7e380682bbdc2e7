"""Running trainings as tracked trials: the MLflow adapter (tracking) and what a run records (record), the
names runs are recorded under (names), the MLflow UI's links and app (ui, ui_app), the Ray Tune driver
(driver), what a trial shares with it (context) and runs (trial), and the Optuna searcher (searcher)."""
