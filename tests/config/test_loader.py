"""Declarative configuration loader: Kong's format, defaults, error locations and warnings."""

from typing import Literal

import pytest
from pydantic import Field

from fhirgate.config import empty_config, load_config_dict, load_config_file
from fhirgate.errors import ConfigError
from fhirgate.gateway.plugins import registry
from fhirgate.gateway.plugins.base import Plugin, PluginConfig


class LimitConfig(PluginConfig):
    minute: int | None = Field(default=None, gt=0, description="requests per minute")
    policy: Literal["local", "redis"] = Field(default="local", description="counter store")


class LimitPlugin(Plugin):
    name = "test-limit"
    priority = 910
    Config = LimitConfig


class EmptyConfig(PluginConfig):
    pass


class AuthPlugin(Plugin):
    name = "test-auth"
    priority = 1450
    Config = EmptyConfig
    no_consumer = True


class SmartPlugin(Plugin):
    name = "smart-on-fhir"
    priority = 1000
    Config = EmptyConfig


@pytest.fixture(autouse=True)
def test_plugins(monkeypatch):
    classes = {"test_limit": LimitPlugin, "test_auth": AuthPlugin, "smart": SmartPlugin}
    monkeypatch.setattr(
        registry, "_BUILTIN", {"test-limit": "test_limit", "test-auth": "test_auth", "smart-on-fhir": "smart"}
    )
    monkeypatch.setattr(registry, "_load", classes.get)


def doc(**entities):
    return {"_format_version": "3.0", **entities}


def errors_of(data):
    with pytest.raises(ConfigError) as info:
        load_config_dict(data)
    return {str(issue) for issue in info.value.issues}


def locations_of(data):
    with pytest.raises(ConfigError) as info:
        load_config_dict(data)
    return [issue.location for issue in info.value.issues]


# --- loading and defaults --------------------------------------------------------------------------


def test_kong_example_file_loads_with_kong_defaults():
    config = load_config_dict(
        doc(
            services=[
                {
                    "name": "fhir",
                    "url": "http://iris:52773/csp/healthshare/fhirserver/fhir/r4",
                    "routes": [{"name": "fhir", "paths": ["/fhir"]}],
                }
            ],
            consumers=[
                {"username": "auth0", "jwt_secrets": [{"key": "https://t.auth0.com/", "algorithm": "RS256"}]}
            ],
        )
    )
    (service,) = config.services
    assert (service.protocol, service.host, service.port, service.path) == (
        "http",
        "iris",
        52773,
        "/csp/healthshare/fhirserver/fhir/r4",
    )
    assert (service.retries, service.connect_timeout, service.read_timeout, service.enabled) == (
        5,
        60000,
        60000,
        True,
    )
    (route,) = config.routes
    assert route.service is service
    assert route.protocols == ("http", "https")
    assert (route.strip_path, route.preserve_host, route.path_handling) == (True, False, "v0")
    assert (route.regex_priority, route.https_redirect_status_code) == (0, 426)
    assert (route.request_buffering, route.response_buffering) == (True, True)
    (consumer,) = config.consumers
    assert consumer.credentials["jwt_secrets"][0]["algorithm"] == "RS256"


def test_https_service_defaults_to_port_443():
    config = load_config_dict(doc(services=[{"name": "s", "protocol": "https", "host": "h"}]))
    assert config.services[0].port == 443
    assert load_config_dict(doc(services=[{"name": "s", "url": "https://h/x"}])).services[0].port == 443


def test_json_and_yaml_files_load_by_content(tmp_path):
    yaml_file = tmp_path / "kong.conf.txt"
    yaml_file.write_text('_format_version: "3.0"\nservices:\n  - name: a\n    url: http://a\n')
    json_file = tmp_path / "kong.yml"
    json_file.write_text('{"_format_version": "3.0", "services": [{"name": "a", "url": "http://a"}]}')
    assert load_config_file(yaml_file).services[0].name == "a"
    assert load_config_file(json_file).services[0].name == "a"


@pytest.mark.parametrize("version", ["1.1", "2.1", "3.0"])
def test_supported_format_versions_load(version):
    assert load_config_dict({"_format_version": version}).format_version == version


def test_unsupported_or_missing_format_version_is_an_error():
    assert locations_of({"_format_version": "4.0"}) == ["_format_version"]
    assert locations_of({}) == ["_format_version"]


def test_top_level_routes_reference_services_by_name_or_id():
    sid = "6f1c8b4e-0a8d-4c3e-9d51-1e4f3c2b9a10"
    config = load_config_dict(
        doc(
            services=[{"name": "a", "url": "http://a"}, {"id": sid, "name": "b", "url": "http://b"}],
            routes=[
                {"name": "ra", "service": "a", "paths": ["/a"]},
                {"name": "rb", "service": {"id": sid}, "paths": ["/b"]},
            ],
        )
    )
    assert [r.service.name for r in config.routes] == ["a", "b"]
    assert config.services[1].id == sid


def test_generated_ids_are_stable_across_loads():
    data = doc(
        services=[{"name": "a", "url": "http://a", "routes": [{"paths": ["/a"]}]}],
        consumers=[{"username": "u"}],
        plugins=[{"name": "test-limit", "config": {"minute": 5}}],
    )
    one, two = load_config_dict(data), load_config_dict(data)
    assert [s.id for s in one.services] == [s.id for s in two.services]
    assert [r.id for r in one.routes] == [r.id for r in two.routes]
    assert [c.id for c in one.consumers] == [c.id for c in two.consumers]
    assert [p.id for p in one.plugins] == [p.id for p in two.plugins]
    assert len({one.services[0].id, one.routes[0].id, one.consumers[0].id, one.plugins[0].id}) == 4


def test_kept_entities_and_credentials_are_parsed_and_kept():
    data = doc(
        upstreams=[{"name": "u", "targets": [{"target": "a:80"}]}],
        certificates=[{"cert": "x", "key": "y"}],
        ca_certificates=[],
        snis=[],
        vaults=[],
        _comment="hello",
        _transform=True,
        _workspace="default",
        acls=[{"consumer": "u", "group": "g"}],
        consumers=[
            {
                "username": "u",
                "acls": [{"group": "admins"}],
                "keyauth_credentials": [{"key": "k"}],
                "basicauth_credentials": [{"username": "x", "password": "y"}],
            }
        ],
    )
    config = load_config_dict(data)
    assert config.extra["upstreams"] == [{"name": "u", "targets": [{"target": "a:80"}]}]
    assert config.extra["_comment"] == "hello"
    assert config.extra["acls"] == [{"consumer": "u", "group": "g"}]
    creds = config.consumers[0].credentials
    assert creds["acls"][0]["group"] == "admins"
    assert creds["keyauth_credentials"][0]["key"] == "k"
    assert "basicauth_credentials" in creds


def test_plugins_are_flattened_with_resolved_scope_and_parsed_config():
    config = load_config_dict(
        doc(
            services=[
                {
                    "name": "s",
                    "url": "http://s",
                    "plugins": [{"name": "test-limit", "config": {"minute": 1}}],
                    "routes": [
                        {
                            "name": "r",
                            "paths": ["/"],
                            "plugins": [{"name": "test-limit", "config": {"minute": 2}}],
                        }
                    ],
                }
            ],
            consumers=[{"username": "c", "plugins": [{"name": "test-limit", "config": {"minute": 3}}]}],
            plugins=[
                {"name": "test-limit", "config": {"minute": 4}},
                {"name": "test-limit", "route": "r", "consumer": "c", "config": {"minute": 5}},
            ],
        )
    )
    s, r, c = config.services[0], config.routes[0], config.consumers[0]
    scopes = {p.config.minute: (p.service_id, p.route_id, p.consumer_id) for p in config.plugins}
    assert scopes == {
        1: (s.id, None, None),
        2: (None, r.id, None),
        3: (None, None, c.id),
        4: (None, None, None),
        5: (None, r.id, c.id),
    }
    assert all(p.plugin_class is LimitPlugin and isinstance(p.config, LimitConfig) for p in config.plugins)
    assert config.plugins[0].config.policy == "local"


def test_is_fhir_comes_from_route_or_service_tag():
    config = load_config_dict(
        doc(
            services=[
                {
                    "name": "fhir",
                    "url": "http://f",
                    "tags": ["fhir"],
                    "routes": [{"name": "a", "paths": ["/fhir"]}],
                },
                {
                    "name": "other",
                    "url": "http://o",
                    "routes": [
                        {"name": "b", "paths": ["/x"], "tags": ["fhir"]},
                        {"name": "c", "paths": ["/y"]},
                    ],
                },
            ]
        )
    )
    assert {r.name: r.is_fhir for r in config.routes} == {"a": True, "b": True, "c": False}


def test_empty_config_has_nothing():
    config = empty_config()
    assert (config.services, config.routes, config.consumers, config.plugins) == ((), (), (), ())


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_fields_are_errors_naming_the_field():
    locs = locations_of(
        doc(
            bogus=1,
            services=[
                {
                    "name": "s",
                    "url": "http://s",
                    "colour": "red",
                    "routes": [{"paths": ["/"], "stip_path": True}],
                }
            ],
            consumers=[{"username": "u", "nickname": "x"}],
            plugins=[{"name": "test-limit", "config": {"minutes": 5}}],
        )
    )
    assert set(locs) == {
        "bogus",
        "services[0].colour",
        "services[0].routes[0].stip_path",
        "consumers[0].nickname",
        "plugins[0].config.minutes",
    }


def test_every_error_is_reported_with_its_location():
    errors = errors_of(
        doc(
            services=[
                {
                    "name": "s",
                    "url": "http://s",
                    "routes": [
                        {"paths": ["/ok"]},
                        {"paths": ["/ok", "no-slash", "~/(unclosed"]},
                    ],
                },
                {"name": "t", "host": "t", "port": 70000, "path": "relative"},
            ],
            routes=[{"service": "nope", "paths": ["/x"]}, {"paths": ["/y"], "hosts": ["bad host"]}],
            plugins=[
                {"name": "test-limit", "config": {"minute": 0}},
                {"name": "test-limit", "route": "ghost"},
            ],
        )
    )
    locations = {e.split(": ", 1)[0] for e in errors}
    assert {
        "services[0].routes[1].paths[1]",
        "services[0].routes[1].paths[2]",
        "services[1].port",
        "services[1].path",
        "routes[0].service",
        "routes[1].hosts[0]",
        "plugins[0].config.minute",
        "plugins[1].route",
    } <= locations
    assert any("invalid regex" in e for e in errors)
    assert any("unknown service 'nope'" in e for e in errors)
    assert any("unknown route 'ghost'" in e for e in errors)


def test_route_without_any_matching_field_is_an_error():
    errors = errors_of(doc(services=[{"name": "s", "url": "http://s", "routes": [{"name": "r"}]}]))
    assert any(
        e.startswith("services[0].routes[0]: must set one of 'methods', 'hosts', 'headers', 'paths'")
        for e in errors
    )


def test_url_and_host_together_are_an_error():
    assert locations_of(doc(services=[{"name": "s", "url": "http://s", "host": "x"}])) == ["services[0].url"]


def test_service_without_host_is_an_error():
    assert locations_of(doc(services=[{"name": "s"}])) == ["services[0].host"]


@pytest.mark.parametrize("timeout", [0, 2**31 - 1])
def test_timeouts_outside_kong_range_are_errors(timeout):
    assert locations_of(doc(services=[{"name": "s", "url": "http://s", "read_timeout": timeout}])) == [
        "services[0].read_timeout"
    ]


def test_lowercase_method_and_host_header_are_errors():
    locs = locations_of(doc(routes=[{"methods": ["get"], "headers": {"Host": ["x"]}}]))
    assert "routes[0].methods[0]" in locs
    assert any(loc.startswith("routes[0].headers") for loc in locs)


def test_duplicate_names_and_ids_are_errors():
    errors = errors_of(
        doc(
            services=[{"name": "s", "url": "http://a"}, {"name": "s", "url": "http://b"}],
            routes=[{"name": "r", "paths": ["/a"]}, {"name": "r", "paths": ["/b"]}],
            consumers=[{"username": "u"}, {"username": "u"}],
        )
    )
    assert any(e.startswith("services[1].name: duplicate service name 's'") for e in errors)
    assert any(e.startswith("routes[1].name: duplicate route name 'r'") for e in errors)
    assert any(e.startswith("consumers[1].username: duplicate consumer username 'u'") for e in errors)


def test_consumer_needs_username_or_custom_id():
    assert locations_of(doc(consumers=[{"tags": ["x"]}])) == ["consumers[0]"]
    assert load_config_dict(doc(consumers=[{"custom_id": "abc"}])).consumers[0].custom_id == "abc"


def test_unknown_plugin_is_an_error_listing_available_plugins():
    errors = errors_of(doc(plugins=[{"name": "bot-detection"}]))
    (error,) = errors
    assert error.startswith("plugins[0].name: plugin 'bot-detection' is not implemented")
    assert "smart-on-fhir, test-auth, test-limit" in error


def test_no_consumer_plugin_scoped_to_a_consumer_is_an_error():
    errors = errors_of(
        doc(
            consumers=[{"username": "u", "plugins": [{"name": "test-auth"}]}],
            plugins=[{"name": "test-auth", "consumer": "u"}],
        )
    )
    assert "consumers[0].plugins[0]: plugin 'test-auth' cannot be applied to a consumer" in errors
    assert "plugins[0].consumer: plugin 'test-auth' cannot be applied to a consumer" in errors


def test_same_plugin_twice_in_one_scope_is_an_error():
    errors = errors_of(
        doc(
            services=[{"name": "s", "url": "http://s", "plugins": [{"name": "test-limit"}]}],
            plugins=[{"name": "test-limit", "service": "s"}, {"name": "test-limit"}],
        )
    )
    assert len(errors) == 1
    (error,) = errors
    assert error.startswith("plugins[0]: plugin 'test-limit' is already configured for this scope")


def test_nested_plugin_may_not_name_its_parent_again():
    assert locations_of(
        doc(services=[{"name": "s", "url": "http://s", "plugins": [{"name": "test-limit", "service": "s"}]}])
    ) == ["services[0].plugins[0].service"]


def test_wrong_types_are_errors_with_locations():
    locs = locations_of(doc(services={"name": "x"}, consumers=[["u"]], routes=[{"paths": "/x"}]))
    assert set(locs) == {"services", "consumers[0]", "routes[0].paths"}


def test_config_error_carries_the_source(tmp_path):
    path = tmp_path / "kong.yml"
    path.write_text('_format_version: "3.0"\nservices:\n  - name: s\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_reports_line_and_column(tmp_path):
    path = tmp_path / "kong.yml"
    path.write_text('_format_version: "3.0"\nservices:\n  - name: [unclosed\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert info.value.issues[0].location.startswith("line ")
    assert "column" in info.value.issues[0].location


# --- warnings -------------------------------------------------------------------------------------


def test_fhir_route_without_smart_on_fhir_warns():
    data = doc(
        services=[
            {"name": "f", "url": "http://f", "tags": ["fhir"], "routes": [{"name": "r", "paths": ["/fhir"]}]}
        ]
    )
    config = load_config_dict(data)
    assert [w.location for w in config.warnings] == ["services[0].routes[0]"]
    assert "smart-on-fhir" in config.warnings[0].message


@pytest.mark.parametrize(
    "plugin",
    [
        {"name": "smart-on-fhir"},
        {"name": "smart-on-fhir", "service": "f"},
        {"name": "smart-on-fhir", "route": "r"},
    ],
)
def test_smart_on_fhir_covering_the_route_silences_the_warning(plugin):
    data = doc(
        services=[
            {"name": "f", "url": "http://f", "tags": ["fhir"], "routes": [{"name": "r", "paths": ["/fhir"]}]}
        ],
        plugins=[plugin],
    )
    assert load_config_dict(data).warnings == ()


def test_disabled_smart_on_fhir_does_not_cover_the_route():
    data = doc(
        services=[
            {"name": "f", "url": "http://f", "tags": ["fhir"], "routes": [{"name": "r", "paths": ["/fhir"]}]}
        ],
        plugins=[{"name": "smart-on-fhir", "enabled": False}],
    )
    assert len(load_config_dict(data).warnings) == 1


def test_https_service_without_tls_verification_warns():
    config = load_config_dict(doc(services=[{"name": "s", "url": "https://s", "tls_verify": False}]))
    assert [w.location for w in config.warnings] == ["services[0].tls_verify"]


def test_short_hs256_secret_warns():
    config = load_config_dict(
        doc(
            consumers=[
                {"username": "u", "jwt_secrets": [{"key": "k", "algorithm": "HS256", "secret": "short"}]}
            ]
        )
    )
    assert [w.location for w in config.warnings] == ["consumers[0].jwt_secrets[0].secret"]


def test_plugin_safety_check_registered_by_name_warns(monkeypatch):
    from fhirgate.config import safety

    monkeypatch.setitem(
        safety._PLUGIN_CHECKS, "test-limit", lambda cfg: ["no limit set"] if cfg["minute"] is None else []
    )
    config = load_config_dict(doc(plugins=[{"name": "test-limit"}]))
    assert [str(w) for w in config.warnings] == ["plugins[0]: no limit set"]
