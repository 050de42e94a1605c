"""Component: publish the final model to the store the serving chart pulls from."""

from kfp import dsl

from apr.cluster.defaults import APR_IMAGE


@dsl.component(base_image=APR_IMAGE, install_kfp_package=False)
def publish(model: dsl.Input[dsl.Model], store: str, name: str, version: str,
            s3_endpoint: str, replace: bool = False) -> str:
    """Upload to `<store>/models/<name>/<version>/` (manifest last); returns that URI. An
    existing version is refused unless `replace` (versions are immutable).

    Credentials come from the environment (a Kubernetes Secret); the endpoint from here.
    """
    from apr.stages.publish import run
    from apr.storage import settings_for

    return run(model.path, store, name, version, settings_for(store, s3_endpoint), replace)
