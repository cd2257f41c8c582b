"""DICOMweb routes under /dicomweb: thin HTTP edges over qido, wado and stow.

QIDO-RS needs view_studies or query_network, WADO-RS view_studies or download, STOW-RS
send_studies. What a caller may see is what index/visibility.py says; anything else is
answered exactly as if it did not exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from imagebridge.accounts.permissions import Permission as P
from imagebridge.actors import Actor
from imagebridge.dicomweb import multipart, qido, rendering, stow, wado
from imagebridge.dicomweb.media import (
    DICOM,
    DICOM_JSON,
    BadAccept,
    MediaRange,
    accepts,
    choose_rendered,
    parse_accept,
)
from imagebridge.dicomweb.multipart import MultipartError, MultipartReader, PartData, PartStart
from imagebridge.dicomweb.pixels import FrameNotFound, PixelError
from imagebridge.dicomweb.rendering import Rendering, RenderingError
from imagebridge.dicomweb.wado import NotAcceptable, NotFound, Target
from imagebridge.hub.auth import Sender, get_hub, hub_of, require
from imagebridge.hub.state import Hub
from imagebridge.index.query import Located
from imagebridge.retention.models import BlobRemoval, RemovalState

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
HubDep = Annotated[Hub, Depends(get_hub)]
Searcher = Annotated[Actor, Depends(require(P.VIEW_STUDIES, P.QUERY_NETWORK))]
Retriever = Annotated[Actor, Depends(require(P.VIEW_STUDIES, P.DOWNLOAD))]
JSON_TYPES = (DICOM_JSON, "application/json")
RENDERED_PARAMS = frozenset({"window", "quality", "viewport", "annotation", "iccprofile"})


@contextmanager
def _answers() -> Iterator[None]:
    """The services' refusals as HTTP answers in the standard's terms."""
    try:
        yield
    except (qido.SearchError, RenderingError, BadAccept) as exc:
        raise HTTPException(400, str(exc)) from exc
    except (NotFound, FrameNotFound) as exc:
        raise HTTPException(404, str(exc)) from exc
    except (NotAcceptable, PixelError) as exc:
        raise HTTPException(406, str(exc)) from exc


def _base_url(request: Request) -> str:
    """Where links in answers point: the configured public URL, else this request's."""
    public = hub_of(request).settings.public_url
    if public:
        return public.rstrip("/") + router.prefix
    base = request.base_url
    server = request.scope.get("server")
    if base.port is None and server and server[1] not in (80, 443):
        # Some clients leave the port out of Host; the request came to this one.
        base = base.replace(port=server[1])
    return str(base).rstrip("/") + router.prefix


def _ranges(request: Request) -> list[MediaRange]:
    with _answers():
        return parse_accept(request.headers.get("accept"))


def _warn(response: Response, request: Request, warnings: list[str]) -> None:
    # PS3.18 8.6.1.2: Warning: 299 {+service}: <text>
    for text in warnings:
        response.headers.append("Warning", f"299 {request.url.netloc}: {text}")


# -- QIDO-RS -------------------------------------------------------------------------------


def _search(request: Request, actor: Actor, hub: Hub, resource: str, **path_keys: str) -> Response:
    if not accepts(_ranges(request), *JSON_TYPES):
        raise HTTPException(406, f"search results are {DICOM_JSON}")
    with _answers():
        spec = qido.parse(resource, list(request.query_params.multi_items()), path_keys)
        with hub.sessions() as session, session.begin():
            found = qido.search(session, actor, spec, _base_url(request))
    # An empty match is 200 with an empty array (PS3.18 as corrected by CP-2473).
    response = JSONResponse(found, media_type=DICOM_JSON)
    _warn(response, request, spec.warnings)
    return response


@router.get("/studies")
def search_studies(request: Request, actor: Searcher, hub: HubDep) -> Response:
    return _search(request, actor, hub, "studies")


@router.get("/series")
def search_series(request: Request, actor: Searcher, hub: HubDep) -> Response:
    return _search(request, actor, hub, "series")


@router.get("/instances")
def search_instances(request: Request, actor: Searcher, hub: HubDep) -> Response:
    return _search(request, actor, hub, "instances")


@router.get("/studies/{study}/series")
def search_study_series(study: str, request: Request, actor: Searcher, hub: HubDep) -> Response:
    return _search(request, actor, hub, "series", StudyInstanceUID=study)


@router.get("/studies/{study}/instances")
def search_study_instances(study: str, request: Request, actor: Searcher, hub: HubDep) -> Response:
    return _search(request, actor, hub, "instances", StudyInstanceUID=study)


@router.get("/studies/{study}/series/{series}/instances")
def search_series_instances(
    study: str, series: str, request: Request, actor: Searcher, hub: HubDep
) -> Response:
    return _search(
        request, actor, hub, "instances", StudyInstanceUID=study, SeriesInstanceUID=series
    )


# -- WADO-RS -------------------------------------------------------------------------------


def _resolve(hub: Hub, actor: Actor, target: Target, resource: str) -> list[Located]:
    with _answers(), hub.sessions() as session, session.begin():
        found = wado.resolve(session, actor, target, resource)
        # Checked before the answer starts (a stream cut short could not say why), from the
        # retention records in one query rather than a look at the store per instance.
        away = set(
            session.scalars(
                select(BlobRemoval.sha256).where(
                    BlobRemoval.sha256.in_({item.blob_sha256 for item in found}),
                    BlobRemoval.state.in_((RemovalState.aside, RemovalState.removed)),
                )
            )
        )
    if any(not hub.blobs.exists(sha) for sha in away):
        raise FileNotFoundError("removed under the retention policy")
    return found


def _retrieve(request: Request, actor: Actor, hub: Hub, target: Target) -> Response:
    ranges = _ranges(request)
    with _answers():
        # Refuse what cannot be sent before recording a retrieve.
        if not any(r.is_multipart or r.type == "*/*" for r in ranges):
            raise NotAcceptable(f'instances are sent as multipart/related; type="{DICOM}"')
        planned = wado.plan_instances(_resolve(hub, actor, target, "instances"), ranges)
    boundary = multipart.new_boundary()
    return StreamingResponse(
        multipart.write_parts(wado.instance_parts(hub.blobs, planned), boundary),
        media_type=multipart.content_type(DICOM, boundary),
    )


def _metadata(request: Request, actor: Actor, hub: Hub, target: Target) -> Response:
    if not accepts(_ranges(request), *JSON_TYPES):
        raise HTTPException(406, f"metadata is {DICOM_JSON}")
    found = _resolve(hub, actor, target, "metadata")
    return StreamingResponse(
        wado.metadata(hub.blobs, found, _base_url(request)), media_type=DICOM_JSON
    )


@router.get("/studies/{study}")
def retrieve_study(study: str, request: Request, actor: Retriever, hub: HubDep) -> Response:
    return _retrieve(request, actor, hub, Target(study))


@router.get("/studies/{study}/metadata")
def retrieve_study_metadata(
    study: str, request: Request, actor: Retriever, hub: HubDep
) -> Response:
    return _metadata(request, actor, hub, Target(study))


@router.get("/studies/{study}/series/{series}")
def retrieve_series(
    study: str, series: str, request: Request, actor: Retriever, hub: HubDep
) -> Response:
    return _retrieve(request, actor, hub, Target(study, series))


@router.get("/studies/{study}/series/{series}/metadata")
def retrieve_series_metadata(
    study: str, series: str, request: Request, actor: Retriever, hub: HubDep
) -> Response:
    return _metadata(request, actor, hub, Target(study, series))


@router.get("/studies/{study}/series/{series}/instances/{instance}")
def retrieve_instance(
    study: str, series: str, instance: str, request: Request, actor: Retriever, hub: HubDep
) -> Response:
    return _retrieve(request, actor, hub, Target(study, series, instance))


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
def retrieve_instance_metadata(
    study: str, series: str, instance: str, request: Request, actor: Retriever, hub: HubDep
) -> Response:
    return _metadata(request, actor, hub, Target(study, series, instance))


def _multipart(media_type: str, parts: list[bytes]) -> Response:
    boundary = multipart.new_boundary()
    part_type = media_type.split(";")[0]
    return StreamingResponse(
        multipart.write_parts(((media_type, [p]) for p in parts), boundary),
        media_type=multipart.content_type(part_type, boundary),
    )


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}")
def retrieve_frames(
    study: str,
    series: str,
    instance: str,
    frames: str,
    request: Request,
    actor: Retriever,
    hub: HubDep,
) -> Response:
    ranges = _ranges(request)
    try:
        numbers = wado.parse_frame_list(frames)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc
    (item,) = _resolve(hub, actor, Target(study, series, instance), "frames")
    with _answers():
        media_type, data = wado.frame_parts(hub.blobs, item, numbers, ranges)
    return _multipart(media_type, data)


@router.get("/studies/{study}/series/{series}/instances/{instance}/bulkdata/{path:path}")
def retrieve_bulkdata(
    study: str,
    series: str,
    instance: str,
    path: str,
    request: Request,
    actor: Retriever,
    hub: HubDep,
) -> Response:
    ranges = _ranges(request)
    (item,) = _resolve(hub, actor, Target(study, series, instance), "bulkdata")
    with _answers():
        media_type, data = wado.bulkdata(hub.blobs, item, path, ranges)
    return _multipart(media_type, data)


def _rendered(
    request: Request, actor: Actor, hub: Hub, target: Target, frames: str = "1"
) -> Response:
    media_type = choose_rendered(_ranges(request))
    if media_type is None:
        raise HTTPException(406, "rendered images are image/jpeg or image/png")
    params = dict(request.query_params)
    with _answers():
        unknown = sorted(set(params) - RENDERED_PARAMS)
        if unknown:
            raise RenderingError(f"unsupported parameter for rendering: {unknown[0][:40]}")
        how = Rendering(
            media_type,
            rendering.parse_window(params["window"]) if "window" in params else None,
            rendering.parse_quality(params["quality"]) if "quality" in params else 90,
            rendering.parse_viewport(params["viewport"]) if "viewport" in params else None,
        )
        try:
            numbers = wado.parse_frame_list(frames)
        except ValueError as exc:
            raise RenderingError(str(exc)) from exc
        if len(numbers) != 1:
            raise RenderingError("a rendered frame is one frame number")
    (item,) = _resolve(hub, actor, target, "rendered")
    with _answers():
        image = wado.rendered(hub.blobs, item, numbers[0], how)
    return Response(image, media_type=media_type)


@router.get("/studies/{study}/series/{series}/instances/{instance}/rendered")
def retrieve_rendered(
    study: str, series: str, instance: str, request: Request, actor: Retriever, hub: HubDep
) -> Response:
    return _rendered(request, actor, hub, Target(study, series, instance))


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered")
def retrieve_frame_rendered(
    study: str,
    series: str,
    instance: str,
    frames: str,
    request: Request,
    actor: Retriever,
    hub: HubDep,
) -> Response:
    return _rendered(request, actor, hub, Target(study, series, instance), frames)


# -- STOW-RS -------------------------------------------------------------------------------


@router.post("/studies", max_body_size=stow.MAX_REQUEST_BYTES)
async def store_instances(request: Request, actor: Sender, hub: HubDep) -> Response:
    return await _store(request, actor, hub, None)


@router.post("/studies/{study}", max_body_size=stow.MAX_REQUEST_BYTES)
async def store_study_instances(
    study: str, request: Request, actor: Sender, hub: HubDep
) -> Response:
    return await _store(request, actor, hub, study)


async def _store(request: Request, actor: Actor, hub: Hub, study: str | None) -> Response:
    with _answers():
        declared = parse_accept(request.headers.get("content-type", "none/none"))
    content = declared[0] if len(declared) == 1 else MediaRange("none/none")
    if content.type != "multipart/related":
        raise HTTPException(415, f'STOW-RS takes multipart/related; type="{DICOM}"')
    part_type = content.params.get("type", DICOM).lower()
    if part_type != DICOM:
        raise HTTPException(415, f"only {DICOM} parts are stored, not {part_type[:60]}")
    if not accepts(_ranges(request), *JSON_TYPES):
        raise HTTPException(406, f"the store response is {DICOM_JSON}")
    refusal = await run_in_threadpool(stow.institution_refusal, hub, actor)
    if refusal:
        raise HTTPException(403, refusal)
    staged: list[stow.StagedPart] = []
    current: stow.PartWriter | None = None
    try:
        reader = MultipartReader(content.params.get("boundary", ""))
        async for chunk in request.stream():
            for event in reader.feed(chunk):
                if isinstance(event, PartStart):
                    if len(staged) >= stow.MAX_PARTS:
                        raise HTTPException(413, f"at most {stow.MAX_PARTS} instances at once")
                    current = stow.PartWriter(hub, event.headers, part_type)
                elif isinstance(event, PartData):
                    assert current is not None
                    current.write(event.data)
                else:
                    assert current is not None
                    staged.append(current.finish())
                    current = None
        reader.close()
        if not staged:
            raise HTTPException(400, "the request holds no instances")
        outcome = await run_in_threadpool(stow.store, hub, actor, study, staged, _base_url(request))
    except MultipartError as exc:
        raise HTTPException(400, f"malformed multipart body: {exc}") from exc
    except ClientDisconnect as exc:
        raise HTTPException(400, "the request was cut off") from exc
    finally:
        # Whatever was not committed is dropped: a failed request stores nothing.
        for part in [*staged, *([current.part] if current else [])]:
            if part.writer is not None:
                part.writer.abort()
    response = JSONResponse(outcome.body, status_code=outcome.status, media_type=DICOM_JSON)
    _warn(response, request, outcome.warnings)
    return response
