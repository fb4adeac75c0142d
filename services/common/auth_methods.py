"""Who may call each gRPC method: MONAI Label's role for users, and the services allowed.

One entry per method of every labelgrid service, keyed by full method name;
tests/unit/test_auth_methods.py checks it against the descriptors of the generated code, so a
new RPC without an entry fails the suite (and the interceptor refuses a method it does not
know is for admins only). The user roles follow MONAI Label's route table for the REST route
that calls the method through the gateway (GET /info/ -> user, PUT /datastore/label ->
annotator, DELETE /datastore/image -> admin ...); the services are the ones whose code calls
the method with their own service token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.auth import ADMIN, ANNOTATOR, REVIEWER, USER, Identity

ALL = frozenset({"gateway", "inference", "training", "activelearning", "supervisor"})
WORKERS = frozenset({"inference", "training", "activelearning"})


AT_LEAST = {
    USER: (USER, ANNOTATOR, REVIEWER, ADMIN),
    ANNOTATOR: (ANNOTATOR, REVIEWER, ADMIN),
    REVIEWER: (REVIEWER, ADMIN),
    ADMIN: (ADMIN,),
}


@dataclass(frozen=True)
class Rule:
    role: str
    """The role a user needs (MONAI Label's RBAC: membership)."""
    services: frozenset[str] = frozenset()
    """Services that may call the method as themselves."""


def _service(name: str, rules: Mapping[str, Rule]) -> dict[str, Rule]:
    return {f"/{name}/{method}": rule for method, rule in rules.items()}


_DATASTORE = "labelgrid.datastore.v1.DatastoreService"
_INFERENCE = "labelgrid.inference.v1.InferenceService"
_TRAINING = "labelgrid.training.v1.TrainingService"
_ACTIVELEARNING = "labelgrid.activelearning.v1.ActiveLearningService"
_REFLECTION = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")

METHOD_RULES: dict[str, Rule] = {
    **_service(_DATASTORE, {
        "GetDatastoreInfo": Rule(USER, ALL),
        "GetStatus": Rule(USER, ALL),
        "ListImages": Rule(USER, ALL),
        "GetImage": Rule(USER, ALL),
        "UploadImage": Rule(ANNOTATOR),
        "DownloadImage": Rule(USER, ALL),
        "DeleteImage": Rule(ADMIN),
        "UpdateImageInfo": Rule(ANNOTATOR, frozenset({"activelearning"})),
        "GetLabel": Rule(USER, ALL),
        "UploadLabel": Rule(ANNOTATOR, frozenset({"inference"})),  # batch inference saves labels
        "DownloadLabel": Rule(USER, ALL),
        "DeleteLabel": Rule(ADMIN),
        "UpdateLabelInfo": Rule(ANNOTATOR),
        "SetImageScore": Rule(ANNOTATOR, frozenset({"activelearning"})),
        "GetDownloadUrl": Rule(USER, WORKERS),
        "ExportDataset": Rule(ANNOTATOR),
        "ExportDatastoreJson": Rule(USER, ALL),
        "WatchChanges": Rule(USER, ALL),  # the gateway's cache of counts and listings
        "Reindex": Rule(ADMIN),
        "AcquireImageLease": Rule(USER, frozenset({"activelearning"})),
        "RenewImageLease": Rule(USER, frozenset({"activelearning", "inference"})),  # inference: infer renews
        "ReleaseImageLease": Rule(USER, frozenset({"activelearning"})),
        "ListImageLeases": Rule(USER, frozenset({"activelearning"})),
        "UploadModelVersion": Rule(ANNOTATOR, frozenset({"training"})),  # PUT /model/{m}: annotator
        "DownloadModelVersion": Rule(ADMIN, WORKERS),  # GET /model/{m}: admin
        "GetModel": Rule(USER, ALL),
        "ListModels": Rule(USER, ALL),
        "GetModelVersion": Rule(USER, ALL),
        "ListModelVersions": Rule(USER, ALL),
        "DeleteModelVersion": Rule(ANNOTATOR),  # DELETE /model/{m}: annotator
        "PinModelVersion": Rule(ADMIN),
        # Records: job state of the services.
        "PutRecord": Rule(ADMIN, ALL),
        "GetRecord": Rule(ADMIN, ALL),
        "ListRecords": Rule(ADMIN, ALL),
        "DeleteRecord": Rule(ADMIN, ALL),
        # Sessions (PUT/GET/DELETE /session/ are a user's right); inference reads their volumes.
        "CreateSession": Rule(USER, frozenset({"gateway"})),
        "GetSession": Rule(USER, frozenset({"gateway", "inference"})),
        "DownloadSession": Rule(USER, frozenset({"gateway", "inference"})),
        "DeleteSession": Rule(USER, frozenset({"gateway"})),
    }),
    **_service(_INFERENCE, {
        "GetAppInfo": Rule(USER, ALL),
        "ListModels": Rule(USER, ALL),
        "GetModel": Rule(USER, ALL),
        "Infer": Rule(USER),
        "InferUpload": Rule(USER),
        "GetQueueStatus": Rule(USER, ALL),
        "ListDevices": Rule(USER, ALL),
        "ServerLive": Rule(USER, ALL),
        "ServerReady": Rule(USER, ALL),
        "ModelReady": Rule(USER, ALL),
        "ModelMetadata": Rule(USER, ALL),
        "CreateBatchInferenceJob": Rule(ADMIN),
        "GetBatchInferenceJob": Rule(USER),
        "ListBatchInferenceJobs": Rule(USER),
        "CancelBatchInferenceJob": Rule(ADMIN),
    }),
    **_service(_TRAINING, {
        "ListTrainers": Rule(USER, ALL),
        "CreateTrainingJob": Rule(ADMIN),
        "GetTrainingJob": Rule(USER),
        "ListTrainingJobs": Rule(USER),
        "CancelTrainingJob": Rule(ADMIN),
        "WatchTrainingJob": Rule(USER),
        "GetTrainStats": Rule(USER, ALL),
        "WatchTrainStats": Rule(USER, ALL),
    }),
    **_service(_ACTIVELEARNING, {
        "ListStrategies": Rule(USER, ALL),
        "ListScoringMethods": Rule(USER, ALL),
        "NextSample": Rule(USER),
        "RenewLease": Rule(USER),
        "ReleaseLease": Rule(USER),
        "ListLeases": Rule(USER),
        "CreateScoringJob": Rule(ANNOTATOR),
        "GetScoringJob": Rule(USER),
        "ListScoringJobs": Rule(USER),
        "CancelScoringJob": Rule(ANNOTATOR),
        "WatchScoringJob": Rule(USER),
    }),
    # Server reflection (grpcurl, Postman) lists every method: any authenticated caller, never
    # an anonymous one (services.common.interceptors: only health is open).
    **{f"/{name}/ServerReflectionInfo": Rule(USER, ALL) for name in _REFLECTION},
}  # fmt: skip


def denial(identity: Identity, full_method: str) -> str | None:
    """Why `identity` may not call `full_method`, or None when it may."""
    # A method without a rule (none of labelgrid's: a test checks) is for admins only.
    rule = METHOD_RULES.get(full_method, Rule(ADMIN))
    if identity.service is not None:
        if identity.service in rule.services:
            return None
        return f"service {identity.service!r} may not call {full_method}"
    # Unlike MONAI Label's REST routes, a role here also lets in every role above it: a REST
    # route open to annotators calls methods that need "user", and a token of a provider may
    # carry only "monailabel-annotator".
    if any(identity.has_role(role) for role in AT_LEAST[rule.role]):
        return None
    return f'Role "{rule.role}" is required to perform this action'
