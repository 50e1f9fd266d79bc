"""moto's S3 server (`python tests/s3_server.py HOST PORT`), answering CompleteMultipartUpload as S3 does.

moto 5.2 names the root element of that reply ``CompleteMultipartUploadResponse``; S3's API reference
names it ``CompleteMultipartUploadResult``, and the AWS C++ SDK inside pyarrow reads any other reply
as an error (after moto has in fact stored the object), so no pyarrow upload to moto could succeed.
This renames the element in that one reply and passes everything else through untouched.
"""

from __future__ import annotations

import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

WRONG, RIGHT = b"CompleteMultipartUploadResponse", b"CompleteMultipartUploadResult"


def s3_conformant(app):
    def application(environ, start_response):
        reply = {}

        def capture(status, headers, exc_info=None):
            reply.update(status=status, headers=headers)
            return lambda data: None

        body = b"".join(app(environ, capture))
        headers = reply["headers"]
        if body.find(WRONG, 0, 300) >= 0:
            body = body.replace(WRONG, RIGHT)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(body))))
        start_response(reply["status"], headers)
        return [body]

    return application


if __name__ == "__main__":
    host, port = sys.argv[1], int(sys.argv[2])
    run_simple(host, port, s3_conformant(DomainDispatcherApplication(create_backend_app)), threaded=True)
