-- The Optuna studies live in their own database beside MLflow's (both use an alembic_version table).
CREATE DATABASE optuna;
