"""Settings: read from the environment once, validated, and turned into Celery configuration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker_config.celery_config import celery_config
from worker_config.settings import Settings, SettingsError, endpoint_parts, get_settings


@pytest.fixture
def clean_env(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_defaults_need_no_environment(clean_env):
    s = get_settings()
    assert (s.MODEL_ID, s.ENGINE, s.DISTRIBUTED_EXECUTOR_BACKEND, s.WORKER_MODE, s.MINIO_BUCKET) == (
        "tiny-wan", None, "mp", "queue", "renders",
    )  # fmt: skip
    assert s.public_endpoint == s.MINIO_ENDPOINT
    assert (s.VISIBILITY_TIMEOUT_S, s.LEASE_RENEW_S, s.restore_interval_s) == (300, 30.0, 10)


def test_values_are_parsed_from_the_environment(clean_env):
    clean_env.setenv("MINIO_SECURE", "true")
    clean_env.setenv("NUM_GPUS", "4")
    clean_env.setenv("ENGINE", "diffusers")
    clean_env.setenv("DISTRIBUTED_EXECUTOR_BACKEND", "ray")
    clean_env.setenv("MINIO_PUBLIC_ENDPOINT", "https://videos.example.com")
    clean_env.setenv("VISIBILITY_TIMEOUT_S", "7200")
    s = get_settings()
    assert (s.MINIO_SECURE, s.NUM_GPUS, s.ENGINE, s.DISTRIBUTED_EXECUTOR_BACKEND) == (True, 4, "diffusers", "ray")
    assert s.VISIBILITY_TIMEOUT_S == 7200 and s.restore_interval_s == 10
    assert endpoint_parts(s.public_endpoint, secure=False) == ("videos.example.com", True)


def test_settings_are_read_once(clean_env):
    first = get_settings()
    clean_env.setenv("MODEL_ID", "something-else")
    assert get_settings() is first


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "DISTRIBUTED_EXECUTOR_BACKEND",
            "threads",
            "DISTRIBUTED_EXECUTOR_BACKEND (got 'threads'): Input should be 'mp' or 'ray'",
        ),
        ("ENGINE", "onnx", "ENGINE (got 'onnx'): Input should be 'fastvideo' or 'diffusers'"),
        ("WORKER_MODE", "turbo", "WORKER_MODE (got 'turbo'): Input should be 'queue' or 'buffer'"),
        ("NUM_GPUS", "0", "NUM_GPUS (got '0'): Input should be greater than or equal to 1"),
        ("MINIO_SECURE", "maybe", "MINIO_SECURE (got 'maybe'): Input should be a valid boolean"),
        ("MINIO_BUCKET", "Bad_Bucket", "MINIO_BUCKET (got 'Bad_Bucket'): String should match pattern"),
        ("MINIO_ENDPOINT", "ftp://x:1", "is not an S3 endpoint"),
        ("MINIO_PUBLIC_ENDPOINT", "http://cdn.example.com/videos", "is not an S3 endpoint"),
        (
            "PRESIGN_EXPIRES_S",
            "999999999",
            "PRESIGN_EXPIRES_S (got '999999999'): Input should be less than or equal to 604800",
        ),
        ("WORKER_PROC_ALIVE_TIMEOUT_S", "4", "WORKER_PROC_ALIVE_TIMEOUT_S (got '4'): Input should be greater than 4"),
        ("VISIBILITY_TIMEOUT_S", "60", "VISIBILITY_TIMEOUT_S must be at least 3 x LEASE_RENEW_S"),
        ("RENDER_TIME_LIMIT_S", "100", "RENDER_TIME_LIMIT_S must be greater than RENDER_SOFT_TIME_LIMIT_S"),
        ("DEVICE", "gpu", "DEVICE (got 'gpu'): Input should be 'auto', 'cuda' or 'cpu'"),
        (
            "FASTVIDEO_ATTENTION_BACKEND",
            "FAST",
            "FASTVIDEO_ATTENTION_BACKEND (got 'FAST'): Input should be 'FLASH_ATTN'",
        ),
        ("FASTVIDEO_VSA_SPARSITY", "1", "FASTVIDEO_VSA_SPARSITY (got '1'): Input should be less than 1"),
    ],
)
def test_invalid_values_name_the_variable_and_what_is_allowed(clean_env, name, value, expected):
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        get_settings()
    assert expected in str(info.value)


def test_celery_is_configured_for_long_gpu_jobs(clean_env):
    clean_env.setenv("REDIS_URL", "redis://:pw@redis:6379/2")
    s = get_settings()
    conf = celery_config(s)
    assert conf["broker_url"] == "redis://:pw@redis:6379/2"
    # Results: Celery's Redis backend that fails at once on a refused password (worker_config/redis_backend.py).
    from celery.app.backends import by_url

    from worker_config.redis_backend import RedisBackend

    assert by_url(conf["result_backend"]) == (RedisBackend, "redis://:pw@redis:6379/2")
    assert conf["accept_content"] == conf["result_accept_content"] == ["json"]
    assert conf["task_serializer"] == conf["result_serializer"] == "json"
    assert conf["task_acks_late"] is conf["task_reject_on_worker_lost"] is conf["task_track_started"] is True
    assert conf["worker_prefetch_multiplier"] == conf["worker_concurrency"] == 1
    assert conf["task_default_queue"] == "render"
    assert conf["task_soft_time_limit"] < conf["task_time_limit"]
    transport = conf["broker_transport_options"]
    assert transport["visibility_timeout"] >= 3 * s.LEASE_RENEW_S  # renewed while the task runs
    assert transport["unacked_restore_interval"] * transport["unacked_restore_throttle"] <= 10
    assert conf["worker_proc_alive_timeout"] > 4  # Celery's default kills a replacement child that loads a model
    assert conf["result_expires"] == s.RESULT_EXPIRES_S


def test_fastwan_settings_pass_through_to_fastvideo(clean_env):
    from tasks.engines.fastvideo_engine import load_options

    clean_env.setenv("FASTVIDEO_ATTENTION_BACKEND", "VIDEO_SPARSE_ATTN")
    clean_env.setenv("FASTVIDEO_VSA_SPARSITY", "0.8")
    settings = get_settings()
    assert settings.FASTVIDEO_ATTENTION_BACKEND == "VIDEO_SPARSE_ATTN"
    assert load_options(settings, cpu=False)["VSA_sparsity"] == 0.8
    blank = Settings(FASTVIDEO_ATTENTION_BACKEND="", FASTVIDEO_VSA_SPARSITY="")
    assert (blank.FASTVIDEO_ATTENTION_BACKEND, blank.FASTVIDEO_VSA_SPARSITY) == (None, None)
    assert "VSA_sparsity" not in load_options(blank, cpu=False)  # FastVideo's own default stays


def test_a_ca_bundle_must_be_a_file(tmp_path):
    with pytest.raises(ValidationError, match="MINIO_CA_BUNDLE"):
        Settings(MINIO_CA_BUNDLE=str(tmp_path / "missing.pem"))
    assert Settings(MINIO_CA_BUNDLE="").MINIO_CA_BUNDLE is None  # blank: the public CAs


def test_the_text_encoder_runs_in_bf16_unless_asked(clean_env):
    from tasks.engines.fastvideo_engine import load_options

    assert load_options(Settings(), cpu=False)["text_encoder_precisions"] == ("bf16",)  # 11.4 GB, not 22.7
    assert load_options(Settings(FASTVIDEO_TEXT_ENCODER_PRECISION="fp32"), cpu=False)["text_encoder_precisions"] == (
        "fp32",
    )
    assert "text_encoder_precisions" not in load_options(Settings(FASTVIDEO_TEXT_ENCODER_PRECISION="auto"), cpu=False)
    assert load_options(Settings(), cpu=True)["text_encoder_precisions"] == ("fp32",)  # a CPU computes in fp32
    with pytest.raises(ValidationError):
        Settings(FASTVIDEO_TEXT_ENCODER_PRECISION="int4")


def test_metrics_listen_on_loopback_unless_asked_and_the_image_asks(clean_env):
    from tests.test_deploy import dockerfile_instructions

    assert get_settings().METRICS_ADDR == "127.0.0.1"  # a shared host: no other user reads them
    image_env = " ".join(a for kind, a in dockerfile_instructions() if kind == "ENV").split()
    assert "METRICS_ADDR=0.0.0.0" in image_env  # a container's network is its own


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"REDIS_URL": "http://redis:6379"}, "REDIS_URL (got 'http://redis:6379'): use redis://"),
        ({"REDIS_URL": "sentinel://:hunter2@s1:26379;sentinel://s2:26379"}, "set REDIS_SENTINEL_MASTER"),
        ({"REDIS_URL": "sentinel://:hunter2@s1:26379;redis://:hunter2@r:6379", "REDIS_SENTINEL_MASTER": "farm"},
         "got a part 'redis://:***@r:6379'"),
        ({"REDIS_URL": "redis://:hunter2@a:6379;redis://b:6379"}, "(got 'redis://:***@a:6379;redis://b:6379')"),
        ({"REDIS_URL": "sentinel://s1:26379", "REDIS_SENTINEL_MASTER": "farm master"}, "REDIS_SENTINEL_MASTER"),
    ],
)  # fmt: skip
def test_redis_urls_are_checked_without_repeating_a_password(clean_env, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        get_settings()
    assert expected in str(caught.value) and "hunter2" not in str(caught.value)


def test_sentinel_settings_become_both_transports_options(clean_env):
    clean_env.setenv("REDIS_URL", "sentinel://:pw@s1:26379/2;sentinel://s2:26380;sentinel://s3")
    clean_env.setenv("REDIS_SENTINEL_MASTER", "farm")
    clean_env.setenv("REDIS_SENTINEL_PASSWORD", "sentinel-pw")
    config = celery_config(get_settings())
    expected = {"master_name": "farm", "sentinel_kwargs": {"password": "sentinel-pw"}}
    for options in ("broker_transport_options", "result_backend_transport_options"):
        assert expected.items() <= config[options].items(), options
    from celery.app.backends import by_url

    from worker_config.redis_backend import SentinelBackend

    assert config["broker_url"] == get_settings().REDIS_URL
    assert by_url(config["result_backend"]) == (SentinelBackend, get_settings().REDIS_URL)

    from worker_config.redis_link import redis_client, sentinel_hosts

    assert sentinel_hosts(get_settings().REDIS_URL) == [("s1", 26379), ("s2", 26380), ("s3", 26379)]
    client = redis_client(get_settings(), timeout_s=1, connect_timeout_s=1)  # connects on first use only
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"], client.connection_pool.service_name) == (2, "pw", "farm")
    assert client.connection_pool.sentinel_manager.sentinel_kwargs["password"] == "sentinel-pw"


def test_each_model_has_its_queue_and_the_router_sends_renders_there(clean_env):
    from celery import Celery

    from worker_config.routing import queue_for, worker_queues

    fastwan = "FastVideo/FastWan2.2-TI2V-5B-Diffusers"
    assert queue_for(fastwan, None) == queue_for(fastwan, "tiny-wan") == "render.fastvideo-fastwan2.2-ti2v-5b-diffusers"
    assert queue_for("tiny-wan", "tiny-wan") == queue_for(None, "tiny-wan") == queue_for(None, None) == "render"
    assert queue_for("/srv/models/My Wan (v2)", None) == "render.srv-models-my-wan-v2"
    assert worker_queues("tiny-wan", None) == ["render", "render.tiny-wan"]  # single-model farm: as before
    assert worker_queues("tiny-wan", "tiny-wan") == ["render", "render.tiny-wan"]  # named or not
    assert worker_queues(fastwan, "tiny-wan") == ["render.fastvideo-fastwan2.2-ti2v-5b-diffusers"]

    clean_env.setenv("DEFAULT_MODEL", "tiny-wan")
    clean_env.setenv("WEBHOOK_QUEUE", "hooks")
    app = Celery("routes")
    app.conf.update(celery_config(get_settings()))
    route = app.amqp.router.route
    assert route({}, "tasks.render", (), {"model": fastwan})["queue"].name == queue_for(fastwan, None)
    assert route({}, "tasks.render", (), {"prompt": "x"})["queue"].name == "render"
    assert route({}, "tasks.render", (), {"model": 7})["queue"].name == "render"  # the worker names the bad field
    assert route({"queue": "explicit"}, "tasks.render", (), {"model": fastwan})["queue"].name == "explicit"
    assert route({}, "tasks.deliver_webhook", (), {})["queue"].name == "hooks"

    clean_env.setenv("MODEL_ID", "///")
    get_settings.cache_clear()
    with pytest.raises(SettingsError, match=r"MODEL_ID .* no letter or digit to name its queue by"):
        get_settings()
