"""Component: publish the final model to the store the serving chart pulls from."""

from kfp import dsl

from apr.components import APR_IMAGE


@dsl.component(base_image=APR_IMAGE, install_kfp_package=False)
def publish(model: dsl.Input[dsl.Model], store: str, name: str, version: str,
            s3_endpoint: str) -> str:
    """Upload to `<store>/models/<name>/<version>/` (manifest last); returns that URI.

    Credentials come from the environment (a Kubernetes Secret); the endpoint from here.
    """
    import os

    from apr.publish import run

    if s3_endpoint:
        os.environ["S3_ENDPOINT"] = s3_endpoint
    return run(model.path, store, name, version)
