# The scorer on CPU: `stratarank serve` under gunicorn. Not built in this project's CI (no base image
# can be pulled there); plain on purpose. Build and run:
#   docker build -t stratarank .
#   docker run -p 8000:8000 -v $PWD/registry:/app/registry stratarank
# Override the service config with -v your.yaml:/app/conf/service.yaml, workers with STRATARANK_WORKERS.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1 STRATARANK_WORKERS=2
WORKDIR /app

# The pinned stack, never resolved by pip (torchrec's metadata would pull the CUDA fbgemm package):
# the same two --no-deps installs as `make venv`.
COPY requirements.lock .
RUN pip install --no-cache-dir --no-deps -r requirements.lock

COPY pyproject.toml setup.py README.md ./
COPY strategy strategy
COPY world world
COPY ranking ranking
COPY online online
COPY experiments experiments
COPY stratarank stratarank
COPY conf conf
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && python -c "import torch, torchrec, lightgbm, flask, strategy; print('stack ok')"

# var/: the embedded bus and the feature snapshot of conf/service.yaml; registry/: models
RUN useradd --create-home --uid 10001 stratarank && mkdir -p /app/registry /app/var \
    && chown stratarank /app/registry /app/var
USER stratarank
EXPOSE 8000
CMD ["sh", "-c", "exec stratarank serve --config conf/service.yaml --host 0.0.0.0 --port 8000 --workers ${STRATARANK_WORKERS}"]
