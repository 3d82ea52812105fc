# miniproxy's image for those who build with Docker. `make image` builds the
# same image without a container engine (image/mkimage); both run the same
# code (package image), so the Debian 12 packages, paths, links and
# entrypoint are the same. image/spec_test.go checks this file against it.
#
#   docker build --build-arg VERSION=$(git describe --tags --always --dirty) -t miniproxy:dev .

# Debian 12 (bookworm): apt-get download fetches the packages the image
# takes its tools from; dpkg-deb unpacks them.
FROM golang:1.26-bookworm AS build
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN apt-get update -qq && \
    go run ./image/mkimage -version "$VERSION" -cache "" -rootfs /rootfs

FROM scratch
COPY --from=build /rootfs /
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENTRYPOINT ["/usr/local/bin/miniproxy"]
