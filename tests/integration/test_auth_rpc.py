"""Every RPC of every labelgrid service has an access rule (services.common.auth_methods)."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pool

# The generated modules register their services in the default descriptor pool.
from labelgrid.activelearning.v1 import activelearning_service_pb2  # noqa: F401
from labelgrid.datastore.v1 import datastore_service_pb2  # noqa: F401
from labelgrid.inference.v1 import inference_service_pb2  # noqa: F401
from labelgrid.training.v1 import training_service_pb2  # noqa: F401

from services.common.auth import ADMIN, ANNOTATOR, ROLES, USER, Identity
from services.common.auth_methods import METHOD_RULES, Rule, denial

SERVICES = [
    "labelgrid.datastore.v1.DatastoreService",
    "labelgrid.inference.v1.InferenceService",
    "labelgrid.training.v1.TrainingService",
    "labelgrid.activelearning.v1.ActiveLearningService",
]


def all_methods() -> list[str]:
    pool = descriptor_pool.Default()
    return [f"/{name}/{method.name}" for name in SERVICES for method in pool.FindServiceByName(name).methods]


def test_every_method_of_every_service_has_a_rule() -> None:
    methods = all_methods()
    assert len(methods) > 60
    assert [method for method in methods if method not in METHOD_RULES] == []


def test_rules_name_known_roles_and_services() -> None:
    for method, rule in METHOD_RULES.items():
        assert rule.role in ROLES, method
        assert rule.services <= {"gateway", "inference", "training", "activelearning", "supervisor"}, method


@pytest.mark.parametrize(
    "identity, method, allowed",
    [
        (Identity("u", frozenset({USER})), "/labelgrid.datastore.v1.DatastoreService/GetStatus", True),
        (Identity("u", frozenset({USER})), "/labelgrid.datastore.v1.DatastoreService/UploadLabel", False),
        (Identity("a", frozenset({ANNOTATOR})), "/labelgrid.datastore.v1.DatastoreService/GetStatus", True),
        (Identity("a", frozenset({ANNOTATOR})), "/labelgrid.datastore.v1.DatastoreService/DeleteImage", False),
        (Identity("d", frozenset({ADMIN})), "/labelgrid.datastore.v1.DatastoreService/Reindex", True),
        (Identity("nobody"), "/labelgrid.datastore.v1.DatastoreService/GetStatus", False),
        (Identity("s", service="training"), "/labelgrid.datastore.v1.DatastoreService/UploadModelVersion", True),
        (Identity("s", service="inference"), "/labelgrid.datastore.v1.DatastoreService/UploadModelVersion", False),
        (Identity("s", service="inference"), "/labelgrid.training.v1.TrainingService/CreateTrainingJob", False),
        # A user with every role is still no service, and a service has no user roles.
        (Identity("d", frozenset(ROLES)), "/labelgrid.datastore.v1.DatastoreService/DeleteImage", True),
        (Identity("s", frozenset(ROLES), service="gateway"), "/labelgrid.datastore.v1.DatastoreService/Reindex", False),
        # A method without a rule is for admins only.
        (Identity("u", frozenset({USER, ANNOTATOR})), "/x.Unknown/Method", False),
        (Identity("d", frozenset({ADMIN})), "/x.Unknown/Method", True),
    ],
)
def test_denial(identity: Identity, method: str, allowed: bool) -> None:
    assert (denial(identity, method) is None) is allowed


def test_a_denial_says_which_role_is_needed() -> None:
    assert denial(Identity("u", frozenset({USER})), "/labelgrid.datastore.v1.DatastoreService/Reindex") == (
        'Role "monailabel-admin" is required to perform this action'
    )
    assert isinstance(METHOD_RULES["/labelgrid.datastore.v1.DatastoreService/Reindex"], Rule)
