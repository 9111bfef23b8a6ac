module github.com/scale/gitops/bootstrap/controlplane/pause

go 1.26.0
