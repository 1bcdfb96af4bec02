import pytest

from devhost.routing import RouteTemplate, RouteTemplateError


@pytest.mark.parametrize(
    ("template", "path", "expected"),
    [
        ("runs", "runs", {}),
        ("runs", "RUNS", {}),
        ("runs/{id}", "runs/abc", {"id": "abc"}),
        ("runs/{id}", "runs", None),
        ("runs/{id}", "runs/abc/extra", None),
        ("runs/{id}/cancel", "runs/r1/cancel", {"id": "r1"}),
        ("runs/{id?}", "runs", {}),
        ("runs/{id?}", "runs/7", {"id": "7"}),
        ("items/{n:int}", "items/42", {"n": "42"}),
        ("items/{n:int}", "items/-3", {"n": "-3"}),
        ("items/{n:int}", "items/4x", None),
        ("items/{name:alpha}", "items/abc", {"name": "abc"}),
        ("items/{name:alpha}", "items/ab1", None),
        ("items/{n:int:min(10)}", "items/9", None),
        ("items/{n:int:min(10)}", "items/10", {"n": "10"}),
        ("items/{n:range(1,5)}", "items/5", {"n": "5"}),
        ("items/{n:range(1,5)}", "items/6", None),
        (
            "ids/{g:guid}",
            "ids/0b9a5f5e-1f7e-4bb0-8a53-1c6a3f6c2d11",
            {"g": "0b9a5f5e-1f7e-4bb0-8a53-1c6a3f6c2d11"},
        ),
        ("ids/{g:guid}", "ids/not-a-guid", None),
        ("files/{*rest}", "files/a/b/c.txt", {"rest": "a/b/c.txt"}),
        ("files/{*rest}", "files", {}),
        ("files/{name}", "files/a%20b", {"name": "a b"}),
        ("lang/{code=en}", "lang", {"code": "en"}),
        ("", "", {}),
    ],
)
def test_route_template_matching(template, path, expected):
    assert RouteTemplate.parse(template).match(path) == expected


@pytest.mark.parametrize(
    "template",
    ["a/{*rest}/b", "a/{x?}/b", "a/{x}/{x}", "a/pre{x}", "a/{x:nosuch}", "a//b"],
)
def test_invalid_templates_are_rejected_with_the_template_named(template):
    with pytest.raises(RouteTemplateError, match="route"):
        RouteTemplate.parse(template)


def test_literal_routes_sort_before_parameters_and_catch_alls_last():
    templates = ["files/{*rest}", "runs/{id}", "runs/latest", "runs/{id:int}"]
    ordered = sorted((RouteTemplate.parse(t) for t in templates), key=lambda r: r.specificity)
    assert [r.template for r in ordered] == ["runs/latest", "runs/{id:int}", "runs/{id}", "files/{*rest}"]


def test_templates_that_match_the_same_paths_share_a_shape():
    assert RouteTemplate.parse("runs/{a}").shape() == RouteTemplate.parse("RUNS/{b}").shape()
    assert RouteTemplate.parse("runs/{a}").shape() != RouteTemplate.parse("runs/{a:int}").shape()


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("a/{x:int}", "a/{y:alpha}"),
        ("a/{x:int}", "a/{y:guid}"),
        ("a/{x:int}", "a/{y:int:min(10)}"),
        ("a/{x:alpha}/{y}", "a/{z:int}/{w}"),
    ],
)
def test_templates_with_different_constraints_do_not_share_a_shape(one, other):
    assert RouteTemplate.parse(one).shape() != RouteTemplate.parse(other).shape()


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("a/{x}", "a/{y}"),
        ("a/{x:int}", "A/{y:int}"),
        ("a/{x:int:min(1)}", "a/{y:min(1):int}"),
        ("a/{x?}", "a/{y?}"),
        ("a/{*x}", "a/{*y}"),
    ],
)
def test_templates_that_differ_only_in_parameter_names_share_a_shape(one, other):
    assert RouteTemplate.parse(one).shape() == RouteTemplate.parse(other).shape()
